"""Configuration loading, validation errors and the commands that check it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.config_errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BASE = '''
gateway_id = "gw-1"
[[vibration]]
id = "motor"
port = "/dev/ttyUSB0"
{vibration}
'''


def _write(tmp_path, vibration="shaft_rpm = 1800", extra=""):
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(vibration=vibration) + extra)
    return path


def test_demo_example_loads():
    cfg = load_config(ROOT / "examples" / "demo.toml")
    assert [v.id for v in cfg.vibration] == ["compressor-motor"]
    assert cfg.vibration[0].envelope_band_hz is None
    assert {m.id for m in cfg.modbus} == {"compressor", "power"}


def test_defaults_applied(tmp_path):
    cfg = load_config(_write(tmp_path))
    v = cfg.vibration[0]
    assert v.frame_length == 4096
    assert v.shaft_hz == pytest.approx(30.0)
    assert v.velocity_band_hz == (10.0, 1000.0)
    assert v.zone_limits_mm_s == (1.4, 2.8, 4.5)
    assert cfg.summary_period_s == 10.0


def test_low_speed_machine_gets_2_hz_band(tmp_path):
    cfg = load_config(_write(tmp_path, "shaft_rpm = 300"))
    assert cfg.vibration[0].velocity_band_hz == (2.0, 1000.0)


def test_flexible_class_limits(tmp_path):
    cfg = load_config(_write(tmp_path, 'shaft_rpm = 1800\nmachine_class = "flexible"'))
    assert cfg.vibration[0].zone_limits_mm_s == (2.3, 4.5, 7.1)


def test_geometry_gives_orders(tmp_path):
    text = ('shaft_rpm = 1800\n[vibration.bearing]\nballs = 9\nball_diameter = 7.94\n'
            'pitch_diameter = 39.04\n')
    cfg = load_config(_write(tmp_path, text))
    assert cfg.vibration[0].orders.bpfi == pytest.approx(5.4152, abs=2e-3)


@pytest.mark.parametrize("vibration, key", [
    ("shaft_rpm = 1800\nframe_lenght = 4096", "vibration[0].frame_lenght"),
    ("shaft_rpm = 1800\nframe_length = 4000", "vibration[0].frame_length"),
    ("shaft_rpm = 1800\noverlap = 0.95", "vibration[0].overlap"),
    ("shaft_rpm = 1800\nenvelope_band_hz = [5000, 2000]", "vibration[0].envelope_band_hz"),
    ('shaft_rpm = 1800\ninput_unit = "mm/s"', "vibration[0].input_unit"),
    ("shaft_rpm = 1800\nshaft_hz = 30", "vibration[0].shaft_hz"),
    ("frame_length = 4096", "vibration[0].shaft_hz"),
    ("shaft_rpm = 1800\nzone_limits_mm_s = [3, 2, 1]", "vibration[0].zone_limits_mm_s"),
    ("shaft_rpm = 1800\nbands_hz = [[100, 50]]", "vibration[0].bands_hz[0]"),
])
def test_invalid_vibration_value_named(tmp_path, vibration, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, vibration))
    assert err.value.key == key
    assert str(tmp_path / "agent.toml") in str(err.value)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="gatway"):
        load_config(_write(tmp_path, extra='gatway = "x"\n'))


def test_duplicate_source_id(tmp_path):
    extra = '[[vibration]]\nid = "motor"\nport = "/dev/ttyUSB1"\nshaft_rpm = 1500\n'
    with pytest.raises(ConfigError, match="only one"):
        load_config(_write(tmp_path, extra=extra))


def test_invalid_toml_reported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("gateway_id = \n")
    with pytest.raises(ConfigError, match="valid UTF-8 TOML"):
        load_config(path)


def test_check_config_command_fails_clearly(tmp_path):
    path = _write(tmp_path, "shaft_rpm = 1800\noverlap = 2")
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "vibration[0].overlap" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_command_accepts_example():
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(ROOT / "examples" / "demo.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_warmup_fills_cache_dir(tmp_path):
    cache = tmp_path / "numba-cache"
    result = subprocess.run([sys.executable, "-m", "agent.cli", "--cache-dir", str(cache), "warmup"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list(cache.rglob("*.nbi")), "no Numba index files written"


def test_unwritable_cache_dir_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "agent.cli", "--cache-dir", str(blocker / "sub"), "warmup"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot be created" in result.stderr


@pytest.mark.parametrize("name", ["mri-room.toml", "ct-room.toml"])
def test_room_examples_load(name):
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.vibration
    assert cfg.modbus
    assert cfg.alarms


def test_alarm_metric_typo_named(tmp_path):
    text = (ROOT / "examples" / "demo.toml").read_text().replace('metric = "low_pressure"', 'metric = "low_presure"', 1)
    path = tmp_path / "typo.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "alarm[0].metric"
    assert "low_pressure" in str(err.value)
