"""Load: 8 producer and 8 consumer processes on one file for a bounded time.

6 producers call ``write``, 2 call ``write_many``; 4 consumers read from ack
0 (each must see every message, in order, exactly once), 4 are members of
one group (together they must finish every message, and nothing acked comes
back). At the end the producer invariants of the kill -9 torture hold too.
Reports throughput and the p99 latency of a write call (figures, not
assertions: the machine is shared).
"""

import os
import time

from stagger_sqlite import StaggerQueue
from tests.faults import check_history, figure, kill9, p99, read_logs, read_member_logs, spawn, torture_seconds


def wait_progress(figure_fn, done_fn, stall=60.0, message="progress"):
    """Wait until ``done_fn()``, failing only when ``figure_fn()`` has not
    changed for ``stall`` seconds: the work to drain grows with the run."""
    last, deadline = None, time.monotonic() + stall
    while not done_fn():
        now_figure = figure_fn()
        if now_figure != last:
            last, deadline = now_figure, time.monotonic() + stall
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress for {stall:g} s: {message} ({now_figure})")
        time.sleep(0.05)


def log_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.endswith("\n")]


def test_8_producers_8_consumers(tmp_path):
    path = str(tmp_path / "q.db")
    StaggerQueue(path).close()
    duration = torture_seconds(6.0)
    plogs = [str(tmp_path / f"p{i}.log") for i in range(8)]
    rlogs = [str(tmp_path / f"r{i}.log") for i in range(4)]
    mlogs = [str(tmp_path / f"m{i}.log") for i in range(4)]
    consumers = [spawn("reader", path, log) for log in rlogs]
    consumers += [spawn("member", path, log, "load", i, 30.0) for i, log in enumerate(mlogs)]
    time.sleep(0.5)  # consumers are starting; producers start together below
    start = time.time() + 1.0
    until = start + duration
    producers = [
        spawn("producer", path, log, f"p{i}", "write_many" if i < 2 else "write", i, "full", 0, until)
        for i, log in enumerate(plogs)
    ]
    try:
        for p in producers:
            assert p.wait(duration + 120) == 0
        with StaggerQueue(path) as q:
            last = q.last_seq
            counts = lambda: [len(log_lines(r)) for r in rlogs]  # noqa: E731
            wait_progress(counts, lambda: min(counts()) >= last, message=f"readers catching up with {last}")

            def group_done():
                info = q.groups()["load"]
                return info.acked == last and info.in_flight == 0 and info.retrying == 0

            wait_progress(lambda: q.groups()["load"], group_done, message=f"the group finishing {last}")
            drained = time.time()
    finally:
        for p in producers + consumers:
            kill9(p)

    history = read_logs(plogs)
    figures = check_history(path, history)
    with StaggerQueue(path) as q:
        ids = {seq: msg["id"] for seq, msg in q.consume(0, wait=False, batch=1000)}
        assert q.dead_letters("load") == []
    for r in rlogs:
        seen = [tuple(line.split()) for line in log_lines(r)]
        assert [int(s) for s, _ in seen] == list(range(1, last + 1)), f"{r} did not see every message once, in order"
        assert all(ids[int(s)] == pid for s, pid in seen)
    delivered, acked, nacks = read_member_logs(mlogs)
    assert sorted(delivered) == list(range(1, last + 1))
    for seq, t_ack in acked.items():
        assert not [t for t in delivered[seq] if t > t_ack], f"seq {seq} came back after its ack"
    deliveries = sum(len(v) for v in delivered.values())
    lat = history.latencies
    figure(
        "load 8 producers + 8 consumers",
        seconds=duration,
        write_calls=len(lat),
        messages=figures["returned"],
        messages_per_s=round(figures["returned"] / duration),
        write_calls_per_s=round(len(lat) / duration),
        p50_write_ms=round(sorted(lat)[len(lat) // 2] * 1000, 2),
        p99_write_ms=round(p99(lat) * 1000, 2),
        reader_deliveries=4 * last,
        group_deliveries=deliveries,
        group_redeliveries=deliveries - len(delivered),
        drain_s_after_last_write=round(drained - until, 2),
        lost=0,
    )
