"""kill -9 of an agent-like process at random moments loses and duplicates nothing.

A collector runs in its own process. Writer processes (forked from a zygote, see
tests/uplink_crash_agent.py) append to one real buffer file and upload to that collector
over HTTP on 127.0.0.1, and are killed with SIGKILL after a random delay, over and over.
A last process drains the buffer. Then every summary a writer reported as committed must
be at the collector under the seq it was given, and no summary may be stored twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgpack

from agent.uplink.buffer import SummaryBuffer

HELPER = Path(__file__).with_name("uplink_crash_agent.py")
KILLS = 60


def wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.01)


class Zygote:
    """Talks to the helper's zygote process over its stdin and stdout."""

    def __init__(self, buffer: Path, url: str, log_dir: Path, env: dict) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER), "zygote", str(buffer), url, str(log_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def command(self, line: str) -> list[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline().split()
        if not reply:
            raise RuntimeError(f"zygote exited while handling {line!r}")
        return reply

    def spawn(self, run: str, mode: str) -> int:
        return int(self.command(f"spawn {run} {mode}")[1])

    def reap(self, pid: int) -> int:
        return int(self.command(f"reap {pid}")[2])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


def read_commits(log_dir: Path) -> list[tuple[int, str]]:
    commits = []
    for path in sorted(log_dir.glob("commits-*.log")):
        for line in path.read_text(encoding="ascii").splitlines():
            marker, seq, uid = line.split(" ")
            assert marker == "C"
            commits.append((int(seq), uid))
    return commits


def read_collector(db_path: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(db_path, timeout=5.0)) as db:
        rows = db.execute("SELECT seq, body FROM summaries ORDER BY seq").fetchall()
    return [(seq, msgpack.unpackb(body)["features"]["uid"]) for seq, body in rows]


def test_kill9_loses_and_duplicates_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    collector_db = tmp_path / "collector.sqlite"
    port_file = tmp_path / "collector.port"
    buffer_path = tmp_path / "buffer.sqlite"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    rng = random.Random(20240613)

    collector = subprocess.Popen([sys.executable, str(HELPER), "collector", str(collector_db), str(port_file)], env=env)
    try:
        wait_for_file(port_file, 20.0)
        url = f"http://127.0.0.1:{int(port_file.read_text())}/v1/summaries"
        zygote = Zygote(buffer_path, url, log_dir, env)
        try:
            statuses = []
            for run in range(KILLS):
                pid = zygote.spawn(f"r{run}", "write")
                time.sleep(rng.uniform(0.005, 0.15))
                os.kill(pid, signal.SIGKILL)
                statuses.append(zygote.reap(pid))
            drain_pid = zygote.spawn("drain", "drain")
            drain_status = zygote.reap(drain_pid)
        finally:
            zygote.close()
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=10)

    killed = [status for status in statuses if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL]
    assert len(killed) == KILLS
    assert os.WIFEXITED(drain_status)
    assert os.WEXITSTATUS(drain_status) == 0

    commits = read_commits(log_dir)
    stored = read_collector(collector_db)
    stored_by_seq = dict(stored)
    stored_uids = [uid for _, uid in stored]
    # The kills land at random moments, so the number of commits depends on the machine's
    # load; the check only needs most runs to have committed something before their kill.
    assert len(commits) > KILLS
    assert len({uid.split("-")[0] for _, uid in commits}) >= KILLS // 2
    assert len({seq for seq, _ in commits}) == len(commits)
    missing = [(seq, uid) for seq, uid in commits if seq not in stored_by_seq]
    assert missing == []
    wrong = [(seq, uid, stored_by_seq[seq]) for seq, uid in commits if stored_by_seq[seq] != uid]
    assert wrong == []
    assert len(set(stored_uids)) == len(stored_uids)

    with SummaryBuffer(buffer_path, budget_bytes=64 * 2**20) as buffer:
        assert buffer.depth() == 0
        assert buffer.counters().get("evicted_routine", 0) == 0
