"""stagger_sqlite beside its peers and raw SQLite, in one run, on one disk.

Usage::

    python benchmarks/run.py [--quick] [--only W1,W2] [--publish]

(``tox -e bench`` runs it. ``stagger-sqlite bench --quick`` is a separate,
smaller check of this machine, stagger_sqlite alone: ``stagger_sqlite/bench.py``.)

Every workload runs every system in the same run, in a temporary directory
beside this file (so on the repository's filesystem), with real processes for
the multi-process workloads. Results: a printed table, and
``benchmarks/results/results.{md,rst,json,png}``; ``--publish`` also copies the
table and chart to ``docs/`` for the README.

Figures are only comparable within one run: ratios to raw apsw are what the
targets are set in. The message is a dict with an id and 100 bytes of text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import apsw  # noqa: E402
import cbor2  # noqa: E402

import systems as S  # noqa: E402
from race import CTX, start_together  # noqa: E402

TEXT = ("stagger-" * 13)[:100]


def message(i: int) -> Dict[str, Any]:
    return {"id": i, "text": TEXT}


MSG_BYTES = len(cbor2.dumps(message(123456)))


# -- results --------------------------------------------------------------

RESULTS: List[Dict[str, Any]] = []


def pct(lat: Sequence[float], q: float) -> Optional[float]:
    if not lat:
        return None
    s = sorted(lat)
    return s[min(len(s) - 1, int(q * len(s)))]


def record(
    workload: str,
    system: str,
    *,
    n: int,
    seconds: float,
    lat: Sequence[float] = (),
    procs: int = 1,
    durability: str = "",
    fsync: str = "",
    unit: str = "msg/s",
    baseline: Optional[str] = None,
    note: str = "",
    **extra: Any,
) -> Dict[str, Any]:
    """Add one result row; ``baseline`` names the raw-apsw row of the same run
    whose throughput the ratio is taken against."""
    rate = n / seconds if seconds > 0 else 0.0
    row = {
        "workload": workload,
        "system": system,
        "msg_bytes": MSG_BYTES,
        "processes": procs,
        "durability": durability,
        "fsync_per_op": fsync,
        "n": n,
        "seconds": round(seconds, 4),
        "throughput": round(rate, 1),
        "unit": unit,
        "p50_ms": _ms(pct(lat, 0.50)),
        "p99_ms": _ms(pct(lat, 0.99)),
        "max_ms": _ms(max(lat) if lat else None),
        "baseline": baseline,
        "ratio": None,
        "note": note,
    }
    row.update(extra)
    if baseline is not None and row["ratio"] is None:
        base = find(baseline)
        if base and base["throughput"]:
            row["ratio"] = round(rate / base["throughput"], 3)
    RESULTS.append(row)
    print(_line(row), flush=True)
    return row


def find(key: str) -> Optional[Dict[str, Any]]:
    """The row named ``"workload/system"``."""
    for r in RESULTS:
        if f"{r['workload']}/{r['system']}" == key:
            return r
    return None


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 3)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return str(v)


COLUMNS = [
    ("workload", "workload"),
    ("system", "system"),
    ("processes", "procs"),
    ("durability", "durability"),
    ("fsync_per_op", "fsync/op"),
    ("n", "n"),
    ("throughput", "throughput"),
    ("unit", "unit"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("ratio", "× raw"),
    ("note", "note"),
]


def _line(r: Dict[str, Any]) -> str:
    return (
        f"{r['workload']:<10} {r['system']:<30} p={r['processes']:<2} {r['durability']:<8} fsync={r['fsync_per_op']:<5} "
        f"{_fmt(r['throughput']):>10} {r['unit']:<8} p50={_fmt(r['p50_ms'])} p99={_fmt(r['p99_ms'])} "
        f"max={_fmt(r['max_ms'])} ×raw={_fmt(r['ratio'])} {r['note']}"
    )


def markdown(results: List[Dict[str, Any]], targets: List[Dict[str, Any]], machine: Dict[str, Any]) -> str:
    out = [f"Message: {MSG_BYTES} bytes of CBOR (a dict with an id and 100 bytes of text).  ",
           f"Machine: {machine['summary']}.  ", f"Run: {machine['when']} ({machine['mode']}).", ""]
    out.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    for r in results:
        out.append("| " + " | ".join(_fmt(r[k]) for k, _ in COLUMNS) + " |")
    out += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in targets:
        out.append(f"| {t['target']} | {t['wanted']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(out) + "\n"


def rst(results: List[Dict[str, Any]], targets: List[Dict[str, Any]]) -> str:
    """The same tables as reStructuredText list-tables (for README.rst)."""
    cols = [c for c in COLUMNS if c[0] not in ("unit", "n")]
    out = [".. list-table::", "   :header-rows: 1", ""]
    out.append("   * - " + "\n     - ".join(h for _, h in cols))
    for r in results:
        cells = [_fmt(r[k]) + (f" {r['unit']}" if k == "throughput" and r["unit"] != "msg/s" else "") for k, _ in cols]
        cells = ["–" if c in ("-", "") else c for c in cells]  # a lone "-" would read as a nested list
        out.append("   * - " + "\n     - ".join(c.replace("|", "/") for c in cells))
    out += ["", ".. list-table::", "   :header-rows: 1", "", "   * - target\n     - wanted\n     - measured\n     - met"]
    for t in targets:
        out.append(f"   * - {t['target']}\n     - {t['wanted']}\n     - {t['measured']}\n     - {'yes' if t['met'] else '**no**'}")
    return "\n".join(out) + "\n"


# -- helpers --------------------------------------------------------------


class Env:
    """Where a run keeps its files: a fresh path per system and workload."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.dir = tempfile.mkdtemp(prefix=".bench-", dir=HERE)
        self._n = 0

    def path(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.dir, f"{self._n:03d}-{name}")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def fill(name: str, path: str, n: int) -> None:
    """Store a backlog of ``n`` messages, in batches (not timed)."""
    q = S.open_system(name, path)
    try:
        for start in range(0, n, 10_000):
            q.put_many([message(i) for i in range(start, min(n, start + 10_000))])
    finally:
        q.close()


def fsync_label(q: Any) -> str:
    return "yes" if q.fsync else "no"


def run_procs(target: Callable[..., None], args_list: List[tuple], timeout: float = 600) -> List[Any]:
    """Run ``target(*args, out)`` in one process per args; gather what each put in ``out``."""
    out = CTX.Queue()
    procs = [CTX.Process(target=target, args=(*a, out)) for a in args_list]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
        except Exception:
            break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return results


# -- limits ---------------------------------------------------------------


def limit_fsync(env: Env, names: List[str]) -> None:
    """fsyncs/s of this disk: a 4 KiB rewrite + fsync, as a WAL commit does."""
    path = env.path("fsync")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    block = b"x" * 4096
    lat = []
    end = time.perf_counter() + (0.3 if env.quick else 1.0)
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        t = time.perf_counter()
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        lat.append(time.perf_counter() - t)
    record("limit", "fsync (4 KiB rewrite)", n=len(lat), seconds=time.perf_counter() - t0, lat=lat,
           durability="-", fsync="yes", unit="fsync/s")
    os.close(fd)


# -- W1: one message per write -------------------------------------------


def time_puts(q: Any, n: int, offset: int = 0) -> tuple:
    lat = []
    t0 = time.perf_counter()
    for i in range(offset, offset + n):
        t = time.perf_counter()
        q.put(message(i))
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - t0, lat


#: Messages each system writes before W1's timed rounds (see w1).
WARM = 1000


def w1(env: Env, names: List[str]) -> None:
    """One message per write, each committed. The systems take turns in
    short blocks (100 durable writes, or 1,000 that do not fsync), round after
    round, so a slow patch of the disk (its fsync time drifts by 2x within
    seconds here) hits every system alike. Throughput is all writes over all
    time; the ratio is the median, over the rounds, of the baseline's block
    time over the system's: paired blocks ran a fraction of a second apart.
    Each system first writes WARM messages, untimed: a queue in use has a
    WAL of its working size, while a new one grows it commit by commit, and
    an fsync of a file that grew also commits its size (1.7x as slow here)."""
    rounds = 6 if env.quick else 50
    block_fsync, block_fast = 100, 1000
    queues = {}
    for name in ["raw-full", "stagger-full", "raw-normal", "stagger-normal"] + [p for p in names if p in S.PEERS]:
        queues[name] = S.open_system(name, env.path(name))
        time_puts(queues[name], WARM)
    blocks: Dict[str, List[float]] = {k: [] for k in queues}
    lats: Dict[str, List[float]] = {k: [] for k in queues}
    size = {k: (block_fsync if queues[k].fsync else block_fast) for k in queues}
    for r in range(rounds):
        for name, q in queues.items():
            seconds, lat = time_puts(q, size[name], WARM + r * size[name])
            blocks[name].append(seconds)
            lats[name] += lat
    for name, q in queues.items():
        base_name = "raw-full" if q.fsync else "raw-normal"
        base = "W1/raw apsw (FULL)" if q.fsync else "W1/raw apsw (NORMAL)"
        paired = None if name == base_name else round(statistics.median(b0 / b1 for b0, b1 in zip(blocks[base_name], blocks[name])), 3)
        record("W1", S.LABELS[name], n=size[name] * rounds, seconds=sum(blocks[name]), lat=lats[name],
               durability=q.durability, fsync=fsync_label(q), baseline=base, ratio=paired,
               note=f"{rounds} rounds of {size[name]}, systems in turn; ratio: median of paired blocks")
        q.close()


# -- W2: batched writes ----------------------------------------------------


def w2(env: Env, names: List[str]) -> None:
    """Batches of 1,000 through each system's batch API. Only the batch call
    is timed (building the dicts is not). The systems take turns batch by
    batch, so a slow patch of the machine hits them alike; the ratio is the
    median, over the batches, of raw apsw's batch time over the system's
    (paired batches ran a few milliseconds apart). Peers that commit per
    message write fewer batches (said in the note)."""
    batches = 20 if env.quick else 90
    systems = ["raw-normal", "stagger-normal", "stagger-full"] + [p for p in names if p in S.PEERS]
    queues = {name: S.open_system(name, env.path(name)) for name in systems}
    per_message = {"pq-ack", "pq"}
    counts = {name: (max(1, batches // 30) if name in per_message else batches) for name in systems}
    lats: Dict[str, List[float]] = {k: [] for k in systems}
    for b in range(batches):
        msgs = [message(b * 1000 + i) for i in range(1000)]
        for name, q in queues.items():
            if b < counts[name]:
                t = time.perf_counter()
                q.put_many(msgs)
                lats[name].append(time.perf_counter() - t)
    base = lats["raw-normal"]
    for name, q in queues.items():
        n = counts[name] * 1000
        label = "raw apsw bulk + cbor2" if name == "raw-normal" else S.LABELS[name]
        paired = None if name == "raw-normal" else round(statistics.median(b0 / b1 for b0, b1 in zip(base, lats[name])), 3)
        note = f"latency per batch of 1,000; systems in turn, {counts[name]} batches; ratio: median of paired batches"
        if name == "pq-ack":
            note += "; no batch API: one commit per message"
        if name == "pq":
            note += "; auto_commit=False + task_done(), yet each put still commits (its sqlite3 `with conn`)"
        record("W2", label, n=n, seconds=sum(lats[name]), lat=lats[name], durability=q.durability,
               fsync=fsync_label(q) if name in per_message else ("1/1000" if q.fsync else "no"),
               baseline="W2/raw apsw bulk + cbor2", ratio=paired, note=note)
        q.close()


# -- W3: drain a backlog ----------------------------------------------------


def _timed_drain(q: Any, count: int) -> tuple:
    lat = []
    got = 0
    t0 = last = time.perf_counter()
    for msg in q.drain(count):
        now = time.perf_counter()
        lat.append(now - last)
        last = now
        got += 1
    return got, time.perf_counter() - t0, lat


def w3(env: Env, names: List[str]) -> None:
    """Drain a backlog of 100,000 from an ack point. Raw apsw and
    stagger_sqlite read without removing, so they drain in interleaved
    rounds (median kept); peers remove what they hand out, so they drain
    once, and those that commit per message get a smaller backlog (said in
    the note)."""
    n = 20_000 if env.quick else 100_000
    rounds = 2 if env.quick else 3
    mine = {}
    for name in ("raw-normal", "stagger-normal"):
        path = env.path(name)
        fill(name, path, n)
        mine[name] = S.open_system(name, path)
    rates: Dict[str, List[float]] = {k: [] for k in mine}
    lats: Dict[str, List[float]] = {k: [] for k in mine}
    for r in range(rounds):
        for name, q in mine.items():
            got, seconds, lat = _timed_drain(q, n)
            assert got == n, f"{name} drained {got} of {n}"
            rates[name].append(got / seconds)
            lats[name] += lat
    for name, q in mine.items():
        label = "raw apsw scan + cbor2" if name == "raw-normal" else S.LABELS[name]
        note = f"latency = gap between messages; median of {rounds} interleaved rounds"
        if name == "stagger-normal":
            note += "; consume(ack=0, batch=50)"
        record("W3", label, n=n, seconds=n / statistics.median(rates[name]), lat=lats[name], durability=q.durability,
               fsync="no", baseline="W3/raw apsw scan + cbor2", note=note)
        q.close()
    for name in [p for p in names if p in S.PEERS]:
        path = env.path(name)
        q0 = S.open_system(name, path)
        slow = name in ("pq-ack", "pq", "litequeue")
        count = min(n, 2000 if q0.fsync else 10_000) if slow else n
        q0.close()
        fill(name, path, count)
        q = S.open_system(name, path)
        got, seconds, lat = _timed_drain(q, count)
        note = "latency = gap between messages"
        if got != count:
            note += f"; got {got} of {count}"
        if count != n:
            note += f"; backlog {count:,} (one commit per message taken)"
        record("W3", S.LABELS[name], n=got, seconds=seconds, lat=lat, durability=q.durability,
               fsync=fsync_label(q) if slow else "no", baseline="W3/raw apsw scan + cbor2", note=note)
        q.close()


def _group_member(path: str, start: Any, out: Any) -> None:
    from stagger_sqlite import StaggerQueue

    with StaggerQueue(path, durability="normal") as q:
        start.wait()
        count, last = 0, time.perf_counter()
        t0 = time.perf_counter()
        with q.consume(group=S.GROUP, batch=50, wait=1.0) as c:
            for seq, msg in c:
                count += 1
                last = time.perf_counter()
    out.put({"count": count, "t0": t0, "last": last})


def w3g(env: Env, names: List[str]) -> None:
    """The same backlog through a group, acks included, 1 and 4 members."""
    n = 20_000 if env.quick else 100_000
    for members in (1, 4):
        path = env.path("w3g")
        fill("stagger-normal", path, n)
        from stagger_sqlite import StaggerQueue

        try:
            with StaggerQueue(path) as q:
                q.consume(group=S.GROUP, wait=False).close()  # create the group before the clock starts
        except TypeError as e:
            record("W3g", f"stagger_sqlite group ×{members}", n=0, seconds=0, procs=members,
                   durability="normal", fsync="no", note=f"consumer groups not available in this build ({e})")
            continue
        outs, t0 = start_together(_group_member, path, members)
        got = sum(o["count"] for o in outs)
        seconds = max(o["last"] for o in outs) - t0
        note = "members: " + "/".join(str(o["count"]) for o in outs)
        if got != n:
            note += f"; finished {got} of {n}"
        record("W3g", f"stagger_sqlite group ×{members}", n=got, seconds=seconds, procs=members,
               durability="normal", fsync="no (acks commit)", baseline="W3/raw apsw scan + cbor2", note=note)


# -- W4: 2 producers + 2 consumers ------------------------------------------


def _w4_producer(name: str, path: str, ids: range, start: Any, out: Any) -> None:
    q = S.open_system(name, path)
    start.wait()
    errors = 0
    ok = []
    for i in ids:
        for attempt in range(100):
            try:
                q.put(message(i))
                ok.append(i)
                break
            except Exception:
                errors += 1
                time.sleep(0.001)
    q.close()
    out.put({"role": "producer", "ok": ok, "errors": errors})


def _w4_member(name: str, path: str, start: Any, producers_done: Any, out: Any) -> None:
    """stagger_sqlite's own way: a group member that waits for new messages."""
    q = S.open_system(name, path)
    start.wait()
    got: List[int] = []
    errors = 0
    last = time.perf_counter()
    while True:
        try:
            with q.q.consume(group=S.GROUP, batch=50, wait=1.0) as c:
                for seq, msg in c:
                    got.append(msg["id"])
                    last = time.perf_counter()
        except Exception:
            errors += 1
        if producers_done.is_set():
            break
    q.close()
    out.put({"role": "consumer", "got": got, "errors": errors, "last": last})


def _w4_consumer(name: str, path: str, start: Any, producers_done: Any, out: Any) -> None:
    if name.startswith("stagger"):
        return _w4_member(name, path, start, producers_done, out)
    q = S.open_system(name, path)
    start.wait()
    got: List[int] = []
    errors = 0
    last = time.perf_counter()
    idle_since = None
    while True:
        try:
            item = q.take()
        except Exception:
            errors += 1
            item = None
            time.sleep(0.001)
        if item is not None:
            msg, token = item
            got.append(msg["id"])
            last = time.perf_counter()
            idle_since = None
            try:
                q.done(token)
            except Exception:
                errors += 1
            continue
        if producers_done.is_set():
            idle_since = idle_since or time.perf_counter()
            if time.perf_counter() - idle_since > 1.0:
                break
        time.sleep(0.0005)
    try:
        q.close()
    except Exception:
        errors += 1
    out.put({"role": "consumer", "got": got, "errors": errors, "last": last})


def w4(env: Env, names: List[str]) -> None:
    """2 producer + 2 consumer processes at once; every message checked."""
    n = 2000 if env.quick else 10_000
    for name in ["raw-full", "stagger-full", "stagger-normal"] + [p for p in names if p in S.PEERS]:
        path = env.path(name)
        try:
            q = S.open_system(name, path)  # create it before the processes race
            fsync = fsync_label(q)
            durability = q.durability
            if name.startswith("stagger"):
                q.q.consume(group=S.GROUP, wait=False).close()
            q.close()
        except TypeError as e:
            record("W4", S.LABELS[name], n=0, seconds=0, procs=4, note=f"consumer groups not available ({e})")
            continue
        start = CTX.Event()
        producers_done = CTX.Event()
        box = CTX.Queue()
        half = n // 2
        prods = [CTX.Process(target=_w4_producer, args=(name, path, range(k * half, (k + 1) * half), start, box))
                 for k in range(2)]
        cons = [CTX.Process(target=_w4_consumer, args=(name, path, start, producers_done, box)) for _ in range(2)]
        for p in prods + cons:
            p.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        start.set()
        outs = []
        deadline = time.monotonic() + 300
        for p in prods:
            p.join(max(1, deadline - time.monotonic()))
        producers_done.set()
        while len(outs) < 4 and time.monotonic() < deadline:
            try:
                outs.append(box.get(timeout=5))
            except Exception:
                if not any(p.is_alive() for p in prods + cons):
                    break
        for p in prods + cons:
            p.join(5)
            if p.is_alive():
                p.kill()
        written = [i for o in outs if o["role"] == "producer" for i in o["ok"]]
        got = [i for o in outs if o["role"] == "consumer" for i in o["got"]]
        errors = sum(o["errors"] for o in outs)
        seen = set(got)
        lost = len(set(written) - seen)
        dups = len(got) - len(seen)
        lasts = [o["last"] for o in outs if o["role"] == "consumer"]
        seconds = (max(lasts) - t0) if lasts else 0
        verdict = "PASS" if lost == 0 and dups == 0 and len(outs) == 4 else "FAIL"
        note = f"{verdict}: lost {lost}, duplicated {dups}, errors raised to the caller {errors}"
        if len(outs) < 4:
            note += f"; only {len(outs)} of 4 processes reported"
        record("W4", S.LABELS[name], n=len(seen), seconds=seconds, procs=4, durability=durability, fsync=fsync,
               baseline="W4/raw apsw (FULL)", note=note, lost=lost, duplicated=dups, errors=errors, passed=verdict == "PASS")


# -- W5: write-to-delivery latency across processes ------------------------


def _w5_producer(path: str, n: int, rate: float, start: Any, out: Any) -> None:
    from stagger_sqlite import StaggerQueue

    with StaggerQueue(path) as q:
        start.wait()
        t0 = time.monotonic()
        for i in range(n):
            due = t0 + i / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            q.write({"id": i, "text": TEXT, "t": time.monotonic()})  # CLOCK_MONOTONIC is system-wide
    out.put("done")


def w5(env: Env, names: List[str]) -> None:
    """Write-to-delivery latency: a producer writes at 500/s (full), a
    consumer process waits with consume(wait=True). Uses the live branch's
    ``bench_latency.latency`` when present (one implementation, shared)."""
    try:
        import bench_latency
    except ImportError:
        bench_latency = None
    if bench_latency is not None:
        r = bench_latency.latency(env.dir, 1.0 if env.quick else 5.0)
        record("W5", "stagger_sqlite full", n=r["delivered"], seconds=r["delivered"] / r["rate_per_s"], procs=2,
               durability="full", fsync="yes", p50_ms=r["p50_ms"], p99_ms=r["p99_ms"], max_ms=r["max_ms"],
               note=f"latency = write returned → consumer has it (from the call: p50 {r['from_call_p50_ms']} ms, "
                    f"p99 {r['from_call_p99_ms']} ms); paced at 500/s; bench_latency.py")
        return
    n = 500 if env.quick else 2500
    path = env.path("w5")
    from stagger_sqlite import StaggerQueue

    with StaggerQueue(path) as q:
        start = CTX.Event()
        box = CTX.Queue()
        p = CTX.Process(target=_w5_producer, args=(path, n, 500.0, start, box))
        p.start()
        lat = []
        c = q.consume(ack=0, wait=30.0)
        start.set()
        t0 = time.perf_counter()
        for seq, msg in c:
            lat.append(time.monotonic() - msg["t"])
            if len(lat) >= n:
                break
        c.close()
        seconds = time.perf_counter() - t0
        p.join(30)
    record("W5", "stagger_sqlite full", n=len(lat), seconds=seconds, lat=lat, procs=2, durability="full",
           fsync="yes", note="latency = write returned → consumer has it; producer paced at 500/s")


# -- W6: 8 threads, one process -------------------------------------------


def _w6_threads(env: Env, name: str, per: int) -> tuple:
    """8 threads writing ``per`` messages each, on a fresh file: (seconds, latencies).
    stagger_sqlite shares one queue object; raw apsw opens a connection per thread."""
    path = env.path(name)
    shared = S.open_system(name, path) if name == "stagger-full" else None
    if shared is None:
        S.open_system(name, path).close()
    lats: List[List[float]] = [[] for _ in range(8)]
    barrier = threading.Barrier(9)

    def writer(k: int) -> None:
        q = shared if shared is not None else S.open_system(name, path)
        barrier.wait()
        for i in range(per):
            t = time.perf_counter()
            q.put(message(k * per + i))
            lats[k].append(time.perf_counter() - t)
        if shared is None:
            q.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if shared is not None:
        shared.close()
    return seconds, [x for l in lats for x in l]


def w6(env: Env, names: List[str]) -> None:
    """8 threads of one process, each write durable when it returns, against
    one thread writing alone. The one- and eight-thread runs alternate
    (pairs, each on fresh files) so the disk's drift hits both; the ratio is
    the median of the pairs'."""
    per = 150 if env.quick else 500
    pairs = 2 if env.quick else 5
    one: List[tuple] = []
    eight: List[tuple] = []
    for _ in range(pairs):
        ref = S.open_system("stagger-full", env.path("w6-ref"))
        one.append(time_puts(ref, per))
        ref.close()
        eight.append(_w6_threads(env, "stagger-full", per))
    record("W6", "stagger_sqlite full, 1 thread", n=pairs * per, seconds=sum(o[0] for o in one),
           lat=[x for o in one for x in o[1]], durability="full", fsync="yes", baseline="W1/raw apsw (FULL)",
           note=f"reference for the next row: {pairs} runs alternating with it")
    row = record("W6", "stagger_sqlite full (group commit)", n=pairs * 8 * per, seconds=sum(e[0] for e in eight),
                 lat=[x for e in eight for x in e[1]], procs=1, durability="full", fsync="shared",
                 baseline="W1/raw apsw (FULL)", note="8 threads")
    # Rates of the pair's runs (the one thread wrote per, the eight 8 * per).
    row["vs_w1_full"] = round(statistics.median(8 * o[0] / e[0] for o, e in zip(one, eight)), 2)
    row["note"] += f"; {row['vs_w1_full']}× one thread (median of {pairs} pairs)"
    seconds, lat = _w6_threads(env, "raw-full", per)
    record("W6", "raw apsw (FULL) (a connection per thread)", n=8 * per, seconds=seconds, lat=lat, procs=1,
           durability="full", fsync="yes", baseline="W1/raw apsw (FULL)", note="8 threads")


# -- W7: 4 producer processes ---------------------------------------------


def _w7_producer(name: str, path: str, ids: range, start: Any, out: Any) -> None:
    q = S.open_system(name, path)
    start.wait()
    lat = []
    t0 = time.perf_counter()
    for i in ids:
        t = time.perf_counter()
        q.put(message(i))
        lat.append(time.perf_counter() - t)
    end = time.perf_counter()
    q.close()
    out.put({"lat": lat, "t0": t0, "end": end})


def _w7_run(env: Env, name: str, nprocs: int, count: int) -> tuple:
    """``nprocs`` producers of ``count`` writes each on a fresh file:
    (seconds from the first start to the last end, latencies)."""
    path = env.path(name)
    S.open_system(name, path).close()
    start = CTX.Event()
    box = CTX.Queue()
    procs = [CTX.Process(target=_w7_producer, args=(name, path, range(k * count, (k + 1) * count), start, box))
             for k in range(nprocs)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    outs = [box.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(o["end"] for o in outs) - min(o["t0"] for o in outs), [x for o in outs for x in o["lat"]]


def w7(env: Env, names: List[str]) -> None:
    """4 producer processes contending for the writer lock, against one
    producer writing as many messages alone. The one- and four-producer runs
    alternate (three pairs) so the disk's drift hits both; the ratio is the
    median of the pairs'."""
    per = 300 if env.quick else 1000
    pairs = 2 if env.quick else 3
    for name in ["stagger-full", "stagger-normal"]:
        count = per if name.endswith("full") else per * 5
        durability = "full" if name.endswith("full") else "normal"
        one: List[tuple] = []
        four: List[tuple] = []
        for _ in range(pairs):
            one.append(_w7_run(env, name, 1, 4 * count))
            four.append(_w7_run(env, name, 4, count))
        base = f"W1/raw apsw ({durability.upper()})"
        record("W7", S.LABELS[name] + ", 1 producer", n=pairs * 4 * count, seconds=sum(o[0] for o in one),
               lat=[x for o in one for x in o[1]], procs=1, durability=durability, fsync="yes" if durability == "full" else "no",
               baseline=base, note=f"reference for the next row: {pairs} runs alternating with it")
        row = record("W7", S.LABELS[name], n=pairs * 4 * count, seconds=sum(f[0] for f in four),
                     lat=[x for f in four for x in f[1]], procs=4, durability=durability,
                     fsync="yes" if durability == "full" else "no", baseline=base, note="4 producer processes")
        row["vs_w1"] = round(statistics.median(o[0] / f[0] for o, f in zip(one, four)), 2)
        row["note"] += f"; {row['vs_w1']}× 1 producer (median of {pairs} pairs)"
    for name in ["raw-full", "raw-normal"]:
        count = per if name.endswith("full") else per * 5
        durability = "full" if name.endswith("full") else "normal"
        seconds, lat = _w7_run(env, name, 4, count)
        record("W7", S.LABELS[name], n=4 * count, seconds=seconds, lat=lat, procs=4, durability=durability,
               fsync="yes" if durability == "full" else "no", baseline=f"W1/raw apsw ({durability.upper()})",
               note="4 producer processes")


# -- W8: memory while draining ---------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _w8_drain(path: str, out: Any) -> None:
    from stagger_sqlite import StaggerQueue

    with StaggerQueue(path, durability="normal") as q:
        base = _rss_mb()
        peak = base
        count = 0
        t0 = time.perf_counter()
        for seq, msg in q.consume(ack=0, wait=False):
            count += 1
            if count % 5000 == 0:
                peak = max(peak, _rss_mb())
        seconds = time.perf_counter() - t0
        peak = max(peak, _rss_mb())
    out.put({"base": base, "peak": peak, "count": count, "seconds": seconds})


def w8(env: Env, names: List[str]) -> None:
    """RSS growth of a process draining a 1,000,000-message backlog."""
    n = 100_000 if env.quick else 1_000_000
    path = env.path("w8")
    fill("stagger-normal", path, n)
    (o,) = run_procs(_w8_drain, [(path,)])
    growth = o["peak"] - o["base"]
    record("W8", "stagger_sqlite normal", n=o["count"], seconds=o["seconds"], durability="normal", fsync="no",
           note=f"RSS {o['base']:.1f} MB after open, peak {o['peak']:.1f} MB: growth {growth:.1f} MB",
           rss_growth_mb=round(growth, 1))


# -- targets ---------------------------------------------------------------


def targets() -> List[Dict[str, Any]]:
    """The issue's targets, checked against this run's rows."""
    out = []

    def ratio_target(label: str, key: str, wanted: float, field: str = "ratio") -> None:
        r = find(key)
        value = r.get(field) if r else None
        out.append({"target": label, "wanted": f"≥ {wanted}×", "measured": _fmt(value) + "×" if value is not None else "not run",
                    "met": value is not None and value >= wanted})

    ratio_target("W1 full vs raw apsw FULL", "W1/stagger_sqlite full", 0.9)
    ratio_target("W1 normal vs raw apsw NORMAL", "W1/stagger_sqlite normal", 0.5)
    ratio_target("W2 write_many vs raw bulk + cbor2", "W2/stagger_sqlite normal", 0.8)
    ratio_target("W3 drain vs raw scan + cbor2", "W3/stagger_sqlite normal", 0.5)
    g = find("W3g/stagger_sqlite group ×4")
    out.append({"target": "W3g 4 members", "wanted": "≥ 50,000 msg/s", "measured": _fmt(g["throughput"]) if g else "not run",
                "met": bool(g and g["throughput"] >= 50_000)})
    w4s = [r for r in RESULTS if r["workload"] == "W4"]
    mine = [r for r in w4s if r["system"].startswith("stagger")]
    # Like with like: a row that fsyncs each operation races the peers that
    # do too; stagger_sqlite normal races the peers that do not.
    for r in mine:
        peers_ok = [p for p in w4s if not p["system"].startswith(("stagger", "raw")) and p.get("passed")
                    and p["fsync_per_op"] == r["fsync_per_op"]]
        best_peer = max(peers_ok, key=lambda p: p["throughput"], default=None)
        ok = bool(r.get("passed")) and (best_peer is None or r["throughput"] > best_peer["throughput"])
        versus = (f"{_fmt(r['throughput'])} vs {best_peer['system']} {_fmt(best_peer['throughput'])}" if best_peer
                  else f"{_fmt(r['throughput'])}; no peer that fsyncs each operation passes")
        out.append({"target": f"W4 {r['system']}", "wanted": "no loss/dup, ahead of passing peers of its fsync class",
                    "measured": f"{r['note'].split(':')[0]}, {versus}", "met": ok})
    w5 = find("W5/stagger_sqlite full")
    out.append({"target": "W5 latency", "wanted": "p50 ≤ 1 ms, p99 ≤ 5 ms",
                "measured": f"p50 {_fmt(w5['p50_ms'])} ms, p99 {_fmt(w5['p99_ms'])} ms" if w5 else "not run",
                "met": bool(w5 and w5["p50_ms"] is not None and w5["p50_ms"] <= 1 and w5["p99_ms"] <= 5)})
    ratio_target("W6 8 threads vs 1 thread (full)", "W6/stagger_sqlite full (group commit)", 4.0, "vs_w1_full")
    w7 = find("W7/stagger_sqlite full")
    out.append({"target": "W7 4 producers (full)", "wanted": "≥ 1× one producer, p99 ≤ 10 ms",
                "measured": f"{_fmt(w7.get('vs_w1'))}×, p99 {_fmt(w7['p99_ms'])} ms" if w7 else "not run",
                "met": bool(w7 and (w7.get("vs_w1") or 0) >= 1 and w7["p99_ms"] <= 10)})
    w8 = find("W8/stagger_sqlite normal")
    out.append({"target": "W8 RSS growth", "wanted": "≤ 50 MB",
                "measured": f"{w8['rss_growth_mb']} MB" if w8 else "not run", "met": bool(w8 and w8["rss_growth_mb"] <= 50)})
    return out


# -- chart -----------------------------------------------------------------


def chart(results: List[Dict[str, Any]], path: str) -> bool:
    """Throughput and p99 latency per system, one bar per result row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    rows = [r for r in results if r["workload"] != "limit" and r["throughput"] and r["unit"] == "msg/s"]
    labels = [f"{r['workload']} {r['system']}" for r in rows]
    colors = ["tab:blue" if r["system"].startswith("stagger") else "tab:gray" if r["system"].startswith("raw") else "tab:orange"
              for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, max(6, 0.28 * len(rows))), sharey=True)
    y = list(range(len(rows)))[::-1]
    a.barh(y, [r["throughput"] for r in rows], color=colors)
    a.set_xscale("log")
    a.set_xlabel("throughput, messages/s (log)")
    a.set_yticks(y)
    a.set_yticklabels(labels, fontsize=8)
    b.barh(y, [r["p99_ms"] or 0 for r in rows], color=colors)
    b.set_xscale("symlog", linthresh=0.1)
    b.set_xlabel("p99 latency per operation, ms (symlog)")
    fig.suptitle("stagger_sqlite (blue) beside raw apsw (gray) and peers (orange); same run, same disk")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------

WORKLOADS = {"limits": limit_fsync, "W1": w1, "W2": w2, "W3": w3, "W3g": w3g, "W4": w4, "W5": w5, "W6": w6,
             "W7": w7, "W8": w8}


def machine(quick: bool) -> Dict[str, Any]:
    cpus = os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return {
        "summary": f"{cpus} cores ({model}), {platform.system()} {platform.release()}, Python {platform.python_version()}, "
                   f"SQLite {apsw.sqlite_lib_version()}",
        "cpus": cpus,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "quick" if quick else "full",
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmarks; returns an exit status (0 even when a target is missed)."""
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: about a minute")
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W6 (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="only stagger_sqlite and raw apsw")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for results.{md,rst,json,png}")
    parser.add_argument("--publish", action="store_true", help="also copy the table and chart to docs/")
    args = parser.parse_args(argv)
    chosen = list(WORKLOADS) if not args.only else ["limits"] + [w.strip() for w in args.only.split(",")]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    names = []
    for p in S.PEERS:
        why = None if not args.no_peers else "--no-peers"
        why = why or S.available(p)
        if why:
            print(f"skipping {S.LABELS[p]}: {why}", file=sys.stderr)
        else:
            names.append(p)
    info = machine(args.quick)
    print(f"# stagger_sqlite benchmarks ({info['mode']}), {info['summary']}", flush=True)
    RESULTS.clear()
    env = Env(args.quick)
    try:
        for w in chosen:
            WORKLOADS[w](env, names)
    finally:
        env.cleanup()
    checked = [t for t in targets() if t["measured"] != "not run"]  # --only: just the targets measured
    print()
    for t in checked:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: wanted {t['wanted']}, measured {t['measured']}")
    os.makedirs(args.out, exist_ok=True)
    md = markdown(RESULTS, checked, info)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": info, "message_bytes": MSG_BYTES, "results": RESULTS, "targets": checked}, f, indent=1)
    with open(os.path.join(args.out, "results.rst"), "w") as f:
        f.write(rst(RESULTS, checked))
    png = os.path.join(args.out, "results.png")
    drew = chart(RESULTS, png)
    print(f"\nwrote {args.out}/results.md, results.json" + (", results.png" if drew else ""))
    if args.publish:
        docs = os.path.join(ROOT, "docs")
        os.makedirs(docs, exist_ok=True)
        shutil.copy(os.path.join(args.out, "results.md"), os.path.join(docs, "benchmarks.md"))
        shutil.copy(os.path.join(args.out, "results.rst"), os.path.join(docs, "benchmarks.rst"))
        if drew:
            shutil.copy(png, os.path.join(docs, "benchmarks.png"))
        print(f"copied to {docs}/benchmarks.md" + (" and benchmarks.png" if drew else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
