"""Change detection on the labelled NAB series (skipped when the data folder is absent).

The figures asserted here are those of the NAB validation section of the docs. A change
that detects fewer windows or raises more false positives fails. When a change improves
the figures, update them here and in the docs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.trend_validation import (
    NAB_PARAMETERS,
    evaluate_folder,
    load_series,
    load_windows,
    main,
    markdown_report,
    parse_timestamp,
)

NAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "nab"
needs_nab = pytest.mark.skipif(not NAB.is_dir(), reason=f"NAB series not found at {NAB}")

AMBIENT = "ambient_temperature_system_failure.csv"
CPU = "cpu_utilization_asg_misconfiguration.csv"
EC2 = "ec2_request_latency_system_failure.csv"

# file: (windows, minimum windows detected, maximum false positives)
EXPECTED = {
    AMBIENT: (2, 2, 2),
    CPU: (1, 1, 2),
    EC2: (3, 2, 0),
}


@pytest.fixture(scope="module")
def scores():
    return {score.name: score for score in evaluate_folder(NAB)}


@needs_nab
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nab_figures_do_not_regress(scores, name):
    windows, detected, false_positives = EXPECTED[name]
    score = scores[name]
    assert len(score.windows) == windows
    assert score.detected >= detected
    assert score.false_positives <= false_positives


@needs_nab
def test_nab_totals_do_not_regress(scores):
    assert sum(s.detected for s in scores.values()) >= 5
    assert sum(s.false_positives for s in scores.values()) <= 4


@needs_nab
def test_nab_delays_inside_windows(scores):
    for score in scores.values():
        for (start, end), delay in zip(score.windows, score.delays):
            if delay is not None:
                assert 0.0 <= delay <= end - start


@needs_nab
def test_nab_no_alarm_during_learning(scores):
    for name, score in scores.items():
        first = load_series(NAB / name).times[0]
        for alarm in score.alarms:
            assert alarm.t - first >= NAB_PARAMETERS.learning_time


@needs_nab
def test_ec2_duplicates_dropped_keeping_first():
    series = load_series(NAB / EC2)
    assert series.duplicates_dropped == 11
    assert series.times.size == 4032 - 11
    assert np.all(np.diff(series.times) > 0)
    lines = (NAB / EC2).read_text().splitlines()[1:]
    first_duplicate = next(line for line in lines if line.startswith("2014-03-09 03:00:00"))
    index = int(np.flatnonzero(series.times == parse_timestamp("2014-03-09 03:00:00"))[0])
    assert series.values[index] == float(first_duplicate.split(",")[1])


@needs_nab
def test_ambient_gaps_kept():
    series = load_series(NAB / AMBIENT)
    assert series.duplicates_dropped == 0
    steps = np.diff(series.times)
    assert np.sum(steps > 3600.0) == 10
    assert steps.max() > 7 * 86400.0


@needs_nab
def test_windows_cover_every_file():
    windows = load_windows(NAB)
    assert sorted(windows) == sorted(EXPECTED)
    for name, pairs in windows.items():
        assert len(pairs) == EXPECTED[name][0]
        for start, end in pairs:
            assert start < end


@needs_nab
def test_report_lists_every_file(scores, capsys):
    report = markdown_report(list(scores.values()))
    for name in EXPECTED:
        assert f"| {name} |" in report
    assert main([str(NAB)]) == 0
    assert "| all |" in capsys.readouterr().out


def test_timestamp_read_as_utc():
    assert parse_timestamp("1970-01-02 00:00:00") == 86400.0
    assert parse_timestamp("2014-03-14 03:31:00.000000") == parse_timestamp("2014-03-14 03:31:00")


@pytest.mark.parametrize("text, words", [
    ("timestamp,value\n2014-01-01 00:05:00,1\n2014-01-01 00:00:00,2\n", "earlier than the row before"),
    ("timestamp,value\n2014-01-01 00:00:00,nan\n", "is not finite"),
    ("timestamp,value\n2014-01-01 00:00:00,abc\n", "is not a number"),
    ("time,value\n2014-01-01 00:00:00,1\n", "header"),
    ("timestamp,value\nyesterday,1\n", "timestamp 'yesterday' is invalid"),
    ("timestamp,value\n2014-01-01 00:00:00+01:00,1\n", "carries a timezone"),
])
def test_load_series_rejects_bad_rows(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        load_series(path)


def test_load_series_drops_repeated_timestamps(tmp_path):
    path = tmp_path / "repeats.csv"
    path.write_text("timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,2\n"
                    "2014-01-01 00:05:00,3\n2014-01-01 00:05:00,4\n2014-01-01 00:10:00,5\n")
    series = load_series(path)
    assert series.duplicates_dropped == 2
    assert series.values.tolist() == [1.0, 2.0, 5.0]
