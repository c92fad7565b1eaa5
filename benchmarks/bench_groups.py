"""Benchmark: consumer-group throughput with several member processes.

Workload: N messages (small dicts, cbor) written up front to a queue with
durability "normal"; then P member processes of one group, batch=50, a
handler that does nothing, consume until nothing is claimable; figure =
messages finished per second (wall time from the start of the members to the
last one's exit, checked: the group's acked == N).

Beside it, persist-queue's SQLiteAckQueue (if installed) with the same
number of processes doing get() + ack() over the same number of messages.
It is not safe across processes (BACKGROUND.md: duplicates), so its figure
is "gets+acks per second", counted by the processes themselves.

Run: python benchmarks/bench_groups.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stagger_sqlite import StaggerQueue  # noqa: E402
from race import start_together  # noqa: E402

MESSAGE = {"order": 17, "customer": "ACME Widgets Ltd", "items": [1, 2, 3], "note": "x" * 40}



def _race(target, path: str, processes: int):
    """Start ``processes`` of ``target(path, start, counts)`` together; return
    what each counted and the seconds from the start to the last one's end."""
    per, t0 = start_together(target, path, processes)
    return per, time.perf_counter() - t0

def _member(path: str, start, counts) -> None:
    q = StaggerQueue(path, durability="normal")
    start.wait()
    n = 0
    with q.consume(group="bench", batch=50, wait=False) as c:
        for _seq, _msg in c:
            n += 1
    counts.put(n)
    q.close()


def run_stagger(path: str, messages: int, processes: int) -> Dict[str, float]:
    with StaggerQueue(path, durability="normal") as q:
        for i in range(0, messages, 10_000):
            q.write_many([MESSAGE] * min(10_000, messages - i))
        q.consume(group="bench", wait=False).close()  # create the group up front
    per, elapsed = _race(_member, path, processes)
    with StaggerQueue(path) as q:
        info = q.groups()["bench"]
    assert info.acked == messages and sum(per) == messages, (info, per)
    return {"seconds": elapsed, "per_s": messages / elapsed, "per_member": per}


def _pq_member(path: str, start, counts) -> None:
    import persistqueue

    q = persistqueue.SQLiteAckQueue(path, auto_commit=True, multithreading=True)
    start.wait()
    n = 0
    while True:
        try:
            item = q.get(block=False)
        except persistqueue.Empty:
            break
        q.ack(item)
        n += 1
    counts.put(n)


def run_persist_queue(path: str, messages: int, processes: int) -> Dict[str, float]:
    import persistqueue

    q = persistqueue.SQLiteAckQueue(path)
    for _ in range(messages):
        q.put(MESSAGE)
    del q
    per, elapsed = _race(_pq_member, path, processes)
    return {"seconds": elapsed, "per_s": sum(per) / elapsed, "handled": sum(per), "duplicates": sum(per) - messages}


def main(quick: bool = False) -> dict:
    messages = 20_000 if quick else 200_000
    pq_messages = 2_000 if quick else 5_000  # it manages a few hundred a second
    processes = 4
    print(
        f"workload: {messages} messages of ~{len(str(MESSAGE))} chars (cbor), durability=normal; "
        f"{processes} member processes of one group, batch=50, no-op handler, until nothing is claimable"
    )
    tmp = tempfile.mkdtemp(prefix="bench_groups_")
    result: dict = {"messages": messages, "processes": processes}
    try:
        s = run_stagger(os.path.join(tmp, "q.db"), messages, processes)
        result["stagger_per_s"] = s["per_s"]
        print(f"stagger_sqlite group: {s['per_s']:,.0f} msg/s finished ({s['seconds']:.2f} s; per member {s['per_member']})")
        try:
            import persistqueue  # noqa: F401
        except ImportError:
            print("persist-queue not installed: no comparison (pip install persist-queue)")
        else:
            print(f"persist-queue SQLiteAckQueue: {pq_messages} messages, {processes} processes, get()+ack() each")
            p = run_persist_queue(os.path.join(tmp, "pq"), pq_messages, processes)
            result["persist_queue_per_s"] = p["per_s"]
            result["ratio"] = s["per_s"] / p["per_s"]
            print(
                f"persist-queue SQLiteAckQueue: {p['per_s']:,.0f} get+ack/s ({p['seconds']:.2f} s, "
                f"{p['duplicates']} handled twice)"
            )
            print(f"ratio: {result['ratio']:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    main(quick=parser.parse_args().quick)
