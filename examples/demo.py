"""A multi-process demo of stagger_sqlite on a local queue file.

Three producer processes write numbered messages to one queue file while two
consumer processes read it from their own ack points with
``consume(ack=..., wait=...)``. Each consumer sees every message (that is the
ack-point model: consumers are independent readers). At the end the demo
checks that every message arrived at every consumer exactly once, in order.

Run:  python examples/demo.py [--messages N] [--keep]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

from stagger_sqlite import StaggerQueue

PRODUCERS = 3
CONSUMERS = 2


def producer(path: str, number: int, count: int) -> None:
    with StaggerQueue(path) as q:
        for i in range(count):
            seq = q.write({"producer": number, "i": i})
            if (i + 1) % max(1, count // 4) == 0:
                print(f"  producer {number}: wrote {i + 1}/{count} (last seqno {seq})", flush=True)


def consumer(path: str, number: int, expected: int, results: "multiprocessing.Queue") -> None:
    ack = 0  # a real consumer would load its saved ack point here
    seen = []
    with StaggerQueue(path) as q:
        # wait=10: stop once nothing new has arrived for 10 s (a safety net;
        # normally it stops as soon as it has every message).
        for seq, msg in q.consume(ack=ack, batch=50, wait=10.0):
            seen.append((seq, msg["producer"], msg["i"]))
            ack = seq  # ... and save it after handling the message
            if len(seen) % max(1, expected // 4) == 0:
                print(f"  consumer {number}: {len(seen)}/{expected} messages, ack point {ack}", flush=True)
            if len(seen) == expected:
                break
    results.put((number, seen))


def check(seen: list, expected_per_producer: int) -> list:
    """Problems with what one consumer saw (empty when all is well)."""
    problems = []
    seqs = [s for s, _, _ in seen]
    if seqs != sorted(set(seqs)):
        problems.append("seqnos not strictly increasing (a duplicate or disorder)")
    for p in range(PRODUCERS):
        mine = [i for _, prod, i in seen if prod == p]
        if mine != list(range(expected_per_producer)):
            problems.append(f"producer {p}: got {len(mine)} messages, not exactly 0..{expected_per_producer - 1} in order")
    return problems


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500, help="messages per producer (default 500)")
    parser.add_argument("--keep", action="store_true", help="keep the queue file and print its path")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="stagger-demo-")
    path = os.path.join(workdir, "demo.db")
    total = PRODUCERS * args.messages
    print(f"queue file: {path}")
    print(f"{PRODUCERS} producers x {args.messages} messages, {CONSUMERS} consumers each reading all {total}")

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    StaggerQueue(path).close()  # create it once, so every process opens the same file
    start = time.monotonic()
    consumers = [ctx.Process(target=consumer, args=(path, n, total, results)) for n in range(CONSUMERS)]
    producers = [ctx.Process(target=producer, args=(path, n, args.messages)) for n in range(PRODUCERS)]
    for p in consumers + producers:
        p.start()
    outcomes = dict(results.get(timeout=300) for _ in consumers)
    for p in consumers + producers:
        p.join(60)
    elapsed = time.monotonic() - start

    ok = all(p.exitcode == 0 for p in consumers + producers)
    for n in range(CONSUMERS):
        problems = check(outcomes[n], args.messages)
        ok = ok and not problems
        status = "every message exactly once, each producer's in order" if not problems else "; ".join(problems)
        print(f"consumer {n}: {len(outcomes[n])}/{total} messages: {status}")
    with StaggerQueue(path) as q:
        print(f"queue: last_seq={q.last_seq}, stored={len(q)}, {elapsed:.1f} s")
        ok = ok and q.last_seq == total
        q.purge()  # every consumer is done with every message
    if args.keep:
        print(f"kept {path}")
    else:
        for suffix in ("", "-wal", "-shm", ".lock"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass
        os.rmdir(workdir)
    print("OK: nothing lost, nothing duplicated" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
