"""Agent-like processes for the kill -9 test of the uplink (tests/test_uplink_crash.py).

    python tests/uplink_crash_agent.py collector DB PORT_FILE
        Run the reference collector on 127.0.0.1 (ephemeral port) until SIGTERM.

    python tests/uplink_crash_agent.py zygote BUFFER URL LOG_DIR
        Import everything once, then read commands from stdin, one per line:
          spawn RUN MODE   fork a child; MODE "write" appends and uploads until killed,
                           "drain" uploads what is pending and exits 0 when the buffer is empty.
                           Prints "pid PID".
          reap PID         wait for the child; prints "reaped PID STATUS" (os.waitpid status).

A writer child appends three summaries per transaction with the real SummaryBuffer
(synchronous=FULL) and, only after append_many returned, writes "C SEQ UID" lines to
LOG_DIR/commits-RUN.log with one os.write call, so a line in the log means the summary
was committed. UID is unique per summary and is stored in its features, so the test can
tell a duplicate (one UID under two seqs) from a repeated delivery (one seq sent twice).
Forked children skip the interpreter start and imports, so 50 kills fit in seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from agent.uplink.buffer import SummaryBuffer
from agent.uplink.collector import serve
from agent.uplink.push import Uploader

GATEWAY = "gw-crash"
BUDGET_BYTES = 64 * 2**20


def make_summary(uid: str, source: str) -> dict:
    return {
        "v": 1,
        "gateway": GATEWAY,
        "source": source,
        "seq": 0,
        "kind": "points",
        "t_start": 1_800_000_000.0,
        "t_end": 1_800_000_010.0,
        "duration_s": 10.0,
        "features": {"uid": uid, "value": {"last": 1.5, "mean": 1.25, "n": 10}},
        "quality": {"polls": 10},
        "alarms": [],
    }


async def write_forever(buffer: SummaryBuffer, url: str, log_fd: int, run: str) -> None:
    stop = asyncio.Event()
    uploader = Uploader(buffer, url, gateway=GATEWAY, batch_size=7, timeout_s=2.0, backoff_initial_s=0.01, backoff_max_s=0.05)
    upload = asyncio.create_task(uploader.run(stop))
    count = 0
    while True:
        batch = [make_summary(f"{run}-{count + i}", f"source-{i}") for i in range(3)]
        rows = buffer.append_many(batch)
        count += 3
        lines = "".join(f"C {seq} {summary['features']['uid']}\n" for (seq, _), summary in zip(rows, batch))
        os.write(log_fd, lines.encode("ascii"))
        uploader.notify()
        await asyncio.sleep(0.003)
        if upload.done():
            upload.result()


async def drain(buffer: SummaryBuffer, url: str) -> bool:
    async with Uploader(buffer, url, gateway=GATEWAY, batch_size=50, timeout_s=2.0, backoff_initial_s=0.01, backoff_max_s=0.05) as uploader:
        return await uploader.drain(20.0)


def child(buffer_path: str, url: str, log_dir: str, run: str, mode: str) -> int:
    buffer = SummaryBuffer(buffer_path, synchronous="FULL", budget_bytes=BUDGET_BYTES)
    if mode == "drain":
        return 0 if asyncio.run(drain(buffer, url)) else 1
    log_fd = os.open(Path(log_dir) / f"commits-{run}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    asyncio.run(write_forever(buffer, url, log_fd, run))
    return 0


def zygote(buffer_path: str, url: str, log_dir: str) -> int:
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["spawn"]:
            run, mode = command[1], command[2]
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = child(buffer_path, url, log_dir, run, mode)
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif command[:1] == ["reap"]:
            pid = int(command[1])
            _, status = os.waitpid(pid, 0)
            print(f"reaped {pid} {status}", flush=True)
        else:
            print(f"error unknown command {line.strip()!r}", flush=True)
    return 0


def collector(db_path: str, port_file: str) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve(db_path, port=0, port_file=port_file, stop=stop)

    asyncio.run(main())
    return 0


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "collector":
        sys.exit(collector(sys.argv[2], sys.argv[3]))
    if role == "zygote":
        sys.exit(zygote(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit(f"unknown role {role!r}; expected collector or zygote")
