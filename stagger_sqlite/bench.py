"""``stagger-sqlite bench``: a quick benchmark of this machine.

A few seconds each of: single writes (durability full, then normal), batch
writes of 100, and draining the result with a plain consumer. Fuller runs,
beside other libraries, live in ``benchmarks/``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

from .queue import StaggerQueue

MSG = {"order": 17, "customer": "c-4711", "items": [1, 2, 3], "note": "x" * 40}


def _timed(seconds: float, step: Callable[[], int]) -> float:
    """Run ``step`` (returns messages done) for ``seconds``; messages/s."""
    done, started = 0, time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def quick(seconds: float = 2.0, directory: Optional[str] = None) -> int:
    """Print messages/s for the basic operations on a scratch queue file."""
    tmp = tempfile.mkdtemp(prefix="stagger-bench-", dir=directory)
    try:
        print(f"{'operation':<34} {'msg/s':>12}")
        rows = []
        for durability in ("full", "normal"):
            with StaggerQueue(os.path.join(tmp, f"{durability}.db"), durability=durability) as q:
                rows.append((f"write, durability={durability}", _timed(seconds, lambda: q.write(MSG) and 1)))
        with StaggerQueue(os.path.join(tmp, "batch.db")) as q:
            batch = [MSG] * 100
            rows.append(("write_many(100), full", _timed(seconds, lambda: len(q.write_many(batch)))))
            started = time.perf_counter()
            n = sum(1 for _ in q.consume(wait=False, batch=500))
            rows.append((f"drain {n} with consume(ack)", n / (time.perf_counter() - started)))
            started = time.perf_counter()
            with q.consume(group="bench", batch=100, wait=False) as c:
                n = sum(1 for _ in c)
            rows.append((f"drain {n} with a group, batch 100", n / (time.perf_counter() - started)))
        for name, rate in rows:
            print(f"{name:<34} {rate:>12,.0f}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
