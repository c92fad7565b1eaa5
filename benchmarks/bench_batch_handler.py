"""Benchmark: the worker pool with a batch handler (``--batch-handler``).

Workload: N small messages written up front (durability "full", the pool's
default); a ``WorkerPool`` of P processes, ``batch_handler=True``, a handler
that only appends one line per list to a file; figure = messages per second
from the first list handled to the last (process start-up excluded),
checked: every message handled exactly once.

Run it against two checkouts to compare them (the checkout is the first
entry of ``PYTHONPATH``, or this repository)::

    python benchmarks/bench_batch_handler.py [--messages 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after PYTHONPATH: another checkout may come first

from stagger_sqlite import StaggerQueue, WorkerPool  # noqa: E402


def handle(msgs):
    with open(os.environ["BENCH_BATCH_OUT"], "a") as f:
        f.write(f"{len(msgs)} {time.time():.6f}\n")


def one(directory: str, messages: int, processes: int, batch: int) -> float:
    """Messages per second of one pool run."""
    work = tempfile.mkdtemp(dir=directory)
    path = os.path.join(work, "q.db")
    os.environ["BENCH_BATCH_OUT"] = out = os.path.join(work, "lists.txt")
    with StaggerQueue(path) as q:
        q.write_many(range(messages))
    pool = WorkerPool(path, "g", "bench_batch_handler:handle", processes=processes, batch=batch,
                      batch_handler=True, until_idle=0.5)
    pool.run()
    with open(out) as f:
        rows = [line.split() for line in f]
    assert sum(int(n) for n, _ in rows) == messages, "a message was handled twice or not at all"
    times = sorted(float(t) for _, t in rows)
    return messages / max(times[-1] - times[0], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers import the handler
    import stagger_sqlite

    print(f"checkout: {os.path.dirname(os.path.dirname(stagger_sqlite.__file__))}")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as directory:
        for processes in (1, 2):
            for batch in (10, 50):
                rates = [one(directory, args.messages, processes, batch) for _ in range(args.rounds)]
                print(f"processes={processes} batch={batch}: {statistics.median(rates):,.0f} msg/s "
                      f"(median of {args.rounds}: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)


if __name__ == "__main__":
    main()
