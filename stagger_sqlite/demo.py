"""``stagger-sqlite demo``: producers and a worker pool on a local queue file.

Producer processes write numbered jobs; a ``WorkerPool`` runs ``handle`` over
group ``demo``; half-way through, one worker process is killed with SIGKILL
(the pool restarts it; its jobs come back by lease). ``handle`` fails now and
then (retried with backoff) and records each job it finished in a second
queue, ``<path>.done``. The summary checks that every job written was
finished at least once (at-least-once: a job whose worker was killed after
recording it but before its ack runs again; the duplicates are counted) and
that none was dead-lettered; the exit status is 1 otherwise.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from .queue import StaggerQueue
from .workers import WorkerPool, group_idle

GROUP = "demo"
FAIL_RATE = 0.02

_done: Optional[StaggerQueue] = None


def handle(msg: Any) -> None:
    """The demo's job: a little work, a 2% failure rate, a record when done."""
    global _done
    if _done is None:
        _done = StaggerQueue(os.environ["STAGGER_DEMO_DONE"], durability="normal")
    time.sleep(random.uniform(0, 0.001))
    if random.random() < FAIL_RATE:
        raise RuntimeError(f"simulated failure of job {msg['job']}")
    _done.write(msg["job"])


def _produce(path: str, first: int, count: int) -> None:
    with StaggerQueue(path) as q:
        for start in range(first, first + count, 100):
            q.write_many({"job": j} for j in range(start, min(start + 100, first + count)))


class Display:
    """One refreshing line on a terminal; a plain line every 2 s otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last_plain = 0.0

    def show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif time.monotonic() - self._last_plain >= 2.0:
            self._last_plain = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run(path: Optional[str] = None, messages: int = 10000, producers: int = 2, processes: int = 2, kill: bool = True) -> int:
    """Run the demo; returns 0 when no job was lost, 1 otherwise."""
    # The summary tells the story; the workers' log of each simulated failure would drown it.
    logging.getLogger("stagger_sqlite").setLevel(logging.ERROR)
    path = path or os.path.join(tempfile.mkdtemp(prefix="stagger-demo-"), "demo.db")
    done_path = path + ".done"
    os.environ["STAGGER_DEMO_DONE"] = done_path  # inherited by the spawned workers
    with StaggerQueue(path) as q, StaggerQueue(done_path, durability="normal") as done:
        base = q.last_seq
        done_base = done.last_seq
        print(f"demo: {producers} producer(s) write {messages} jobs to {path}; "
              f"{processes} worker process(es) run them", file=sys.stderr)
        pool = WorkerPool(path, GROUP, handle, processes=processes, batch=20, lease=2.0, max_attempts=10)
        # Jobs are numbered from the queue's current end, so reruns on one file add up.
        first = base + 1
        ctx = multiprocessing.get_context("spawn")
        share = [messages // producers + (i < messages % producers) for i in range(producers)]
        procs = []
        start = first
        for n in share:
            procs.append(ctx.Process(target=_produce, args=(path, start, n), name="producer"))
            start += n
        runner = threading.Thread(target=pool.run, name="pool")
        began = time.monotonic()
        # The group starts at the queue's current end: only this run's jobs.
        with q.consume(group=GROUP, ack=base, wait=False):
            pass
        runner.start()
        for p in procs:
            p.start()
        display = Display()
        killed = False
        last_acked, last_t, rate = base, time.monotonic(), 0.0
        try:
            while True:
                time.sleep(0.25)
                info = q.groups().get(GROUP)
                acked = info.acked if info else base
                now = time.monotonic()
                rate = 0.7 * rate + 0.3 * (acked - last_acked) / max(now - last_t, 1e-6)
                last_acked, last_t = acked, now
                written = q.last_seq - base
                finished = acked - base
                if info:
                    display.show(
                        f"written {written:>7}  finished {finished:>7}  {rate:8,.0f}/s  "
                        f"lag {info.lag:>6}  in flight {info.in_flight:>4}  retrying {info.retrying:>3}  dead {info.dead}"
                    )
                if kill and not killed and finished >= messages // 2:
                    killed = _kill_one(pool)
                producing = any(p.is_alive() for p in procs)
                restarted = not killed or pool.restarts > 0  # show the restart before the end
                if not producing and written >= messages and restarted and group_idle(q, GROUP):
                    break
                if not runner.is_alive():
                    break
        finally:
            display.end()
            pool.stop()
            runner.join()
            for p in procs:
                p.join()
        elapsed = time.monotonic() - began
        info = q.groups()[GROUP]
        seen: dict = {}
        for _, job in done.consume(ack=done_base, wait=False):
            seen[job] = seen.get(job, 0) + 1
    expected = set(range(first, first + messages))
    lost = sorted(expected - set(seen))
    dupes = sum(n - 1 for j, n in seen.items() if j in expected)
    print(f"demo: {messages} jobs in {elapsed:.1f} s ({messages / elapsed:,.0f}/s); "
          f"worker restarts: {pool.restarts}; dead letters: {info.dead}", file=sys.stderr)
    print(f"demo: finished at least once: {len(expected) - len(lost)}/{messages}; "
          f"run twice (a killed worker's job rerun): {dupes}; lost: {len(lost)}", file=sys.stderr)
    if lost or info.dead:
        print(f"demo: FAILED: lost jobs {lost[:10]}{'...' if len(lost) > 10 else ''}", file=sys.stderr)
        return 1
    print("demo: ok, nothing lost", file=sys.stderr)
    return 0


def _kill_one(pool: WorkerPool) -> bool:
    pids = pool.pids()
    if not pids:
        return False
    os.kill(pids[0], signal.SIGKILL)
    print(file=sys.stderr) if sys.stderr.isatty() else None
    print(f"demo: killed worker process {pids[0]} with SIGKILL; the pool restarts it", file=sys.stderr)
    return True
