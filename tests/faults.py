"""Shared machinery of the fault-injection suite (issue 7).

- ``torture_seconds(default)``: how long a bounded run lasts; with
  ``STAGGER_TORTURE=1`` (``tox -e torture``) it is ``STAGGER_TORTURE_SECONDS``
  (default 120) instead.
- ``payload(id)``: the message written for a unique payload id; its content is
  derived from the id, so a checker can tell a complete message from a damaged
  or mixed-up one without keeping a copy.
- ``producer(...)``: the main of a producer process that logs what it is about
  to write (``I``) and, after the call returned, what returned (``R``). A log
  line is one ``os.write`` to an ``O_APPEND`` file: SIGKILL cannot tear it, and
  the kernel keeps it whatever happens to the process.
- ``read_logs`` / ``check_history``: the invariants at the end of a run.
- ``figure(name, **values)``: figures printed at the end of the pytest run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> {figure: value}, printed by conftest's terminal summary.
FIGURES: Dict[str, Dict[str, object]] = {}


def torture() -> bool:
    return os.environ.get("STAGGER_TORTURE", "") not in ("", "0")


def torture_seconds(default: float) -> float:
    """Seconds a bounded fault run lasts (the long run: STAGGER_TORTURE_SECONDS)."""
    if torture():
        return float(os.environ.get("STAGGER_TORTURE_SECONDS", "120"))
    return default


def scaled(default: int, long: int) -> int:
    """A count for the bounded run, or for the long run."""
    return long if torture() else default


def figure(name: str, **values: object) -> None:
    """Record figures of one test; printed in the pytest summary (and appended
    as JSON lines to ``$STAGGER_FIGURES`` when set)."""
    FIGURES.setdefault(name, {}).update(values)
    out = os.environ.get("STAGGER_FIGURES")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": name, **values}) + "\n")


# -- payloads --------------------------------------------------------------


def payload(pid: str) -> dict:
    """The message of payload id ``pid``: content (and size, 0..~9 KB so some
    messages span overflow pages) derived from the id."""
    h = hashlib.sha256(pid.encode()).digest()
    size = h[0] * 36 if h[1] < 32 else h[0] % 64
    return {"id": pid, "blob": (h * (size // 32 + 1))[:size]}


def check_payload(seq: int, msg: object) -> str:
    """The id of a stored message after checking it is exactly ``payload(id)``."""
    assert isinstance(msg, dict) and isinstance(msg.get("id"), str), f"seq {seq}: not one of ours: {msg!r:.200}"
    assert msg == payload(msg["id"]), f"seq {seq}: content of {msg['id']} damaged"
    return msg["id"]


# -- producer processes ----------------------------------------------------


def producer(
    path: str, log: str, name: str, mode: str, seed: int, durability: str = "full", limit: int = 0, until: float = 0.0
) -> None:
    """Write forever (or ``limit`` batches), logging intents and returns.

    ``mode``: "write" (one message per call), "write_many" (1-20 per call)
    or "schedule" (one message due in 0-0.5 s; logged ``S id`` once returned).
    Log lines: ``I id id ...`` before the call; ``R id=seq id=seq ...`` after
    it returned; ``L seconds`` the call's latency. Stops after ``limit``
    calls or at epoch time ``until`` when given.
    """
    from stagger_sqlite import StaggerQueue

    rnd = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    q = StaggerQueue(path, timeout=None, durability=durability)
    n = 0
    batches = 0
    while (not limit or batches < limit) and (not until or time.time() < until):
        k = rnd.randint(1, 20) if mode == "write_many" else 1
        ids = [f"{name}.{n + i}" for i in range(k)]
        os.write(fd, ("I " + " ".join(ids) + "\n").encode())
        t0 = time.perf_counter()
        if mode == "schedule":
            q.schedule(payload(ids[0]), delay=rnd.uniform(0.0, 0.5))
            os.write(fd, f"S {ids[0]}\n".encode())
            n += 1
            batches += 1
            continue
        if mode == "write":
            seqs = [q.write(payload(ids[0]))]
        else:
            seqs = q.write_many([payload(i) for i in ids])
        dt = time.perf_counter() - t0
        os.write(fd, ("R " + " ".join(f"{i}={s}" for i, s in zip(ids, seqs)) + f" L={dt:.6f}\n").encode())
        n += k
        batches += 1
    q.close()


def spawn(fn: str, *args: object) -> subprocess.Popen:
    """Start ``tests.faults.<fn>(*args)`` in a new Python process."""
    code = f"import sys; from tests.faults import {fn}; {fn}(*{args!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)


# -- reading logs and checking ---------------------------------------------


class History:
    """What producers said they were about to write, and what returned."""

    def __init__(self) -> None:
        self.intents: List[List[str]] = []  # one list of ids per call
        self.returned: Dict[str, int] = {}  # id -> seq returned
        self.scheduled: List[str] = []  # ids whose schedule() returned
        self.latencies: List[float] = []

    @property
    def calls_returned(self) -> int:
        return len(self.latencies)


def read_logs(paths: List[str]) -> History:
    h = History()
    for p in paths:
        if not os.path.exists(p):
            continue
        with open(p) as f:
            for line in f:
                if not line.endswith("\n"):
                    continue  # cannot happen (one write per line), but never trust a tail
                parts = line.split()
                if parts[0] == "I":
                    h.intents.append(parts[1:])
                elif parts[0] == "S":
                    h.scheduled.append(parts[1])
                elif parts[0] == "R":
                    for item in parts[1:]:
                        k, v = item.split("=")
                        if k == "L":
                            h.latencies.append(float(v))
                        else:
                            assert k not in h.returned, f"id {k} returned twice"
                            h.returned[k] = int(v)
    return h


def read_all(path: str, **kw: object) -> List[Tuple[int, object]]:
    from stagger_sqlite import StaggerQueue

    with StaggerQueue(path, **kw) as q:
        return list(q.consume(0, wait=False, batch=500))


def check_history(path: str, h: History, purged: int = 0) -> Dict[str, int]:
    """The "nothing lost" invariants of a producer run. Returns figures.

    - every write that returned is stored exactly once, at the seqno it
      returned, with its content (unless a purge up to ``purged`` removed it);
    - every stored message is one a producer meant to write, stored once;
    - a ``write_many`` batch is stored all or none, at consecutive seqnos;
    - seqnos increase and ``last_seq`` is at least the highest stored;
    - ``PRAGMA integrity_check`` passes.
    """
    import apsw

    rows = read_all(path)
    seqs = [s for s, _ in rows]
    assert seqs == sorted(set(seqs)), "seqnos not strictly increasing"
    where: Dict[str, int] = {}
    for seq, msg in rows:
        pid = check_payload(seq, msg)
        assert pid not in where, f"{pid} stored twice: seq {where[pid]} and {seq}"
        where[pid] = seq
    for pid, seq in h.returned.items():
        if seq <= purged and pid not in where:
            continue
        assert where.get(pid) == seq, f"{pid} returned seq {seq} but is stored at {where.get(pid)}"
    for pid in h.scheduled:  # promoted exactly once (stored once: checked above)
        assert pid in where, f"scheduled {pid} returned but never became a message"
    intended = {pid for batch in h.intents for pid in batch}
    stray = set(where) - intended
    assert not stray, f"stored but never intended: {sorted(stray)[:5]}"
    in_doubt = 0
    for batch in h.intents:
        stored = [where[p] for p in batch if p in where]
        if stored and stored[0] <= purged + len(batch):
            continue  # a purge may have cut this batch
        assert len(stored) in (0, len(batch)), f"batch {batch[0]}.. stored partly: {len(stored)}/{len(batch)}"
        if stored:
            assert stored == list(range(stored[0], stored[0] + len(batch))), f"batch {batch[0]}.. not consecutive"
        if batch[0] not in h.returned:
            in_doubt += 1
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='messages'").fetchall()
    finally:
        conn.close()
    assert not seqs or (last and last[0][0] >= seqs[-1])
    return {"stored": len(rows), "returned": len(h.returned), "calls_in_doubt": in_doubt}


def p99(values: List[float]) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * 0.99))]


def reader(path: str, log: str) -> None:
    """A plain consumer that resumes after the last seqno in its log and logs
    ``seq id`` for every message it is handed."""
    from stagger_sqlite import StaggerQueue

    ack = 0
    if os.path.exists(log):
        with open(log) as f:
            lines = [line for line in f if line.endswith("\n")]
        if lines:
            ack = int(lines[-1].split()[0])
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with StaggerQueue(path) as q:
        for seq, msg in q.consume(ack, batch=rnd_batch(), wait=True):
            os.write(fd, f"{seq} {check_payload(seq, msg)}\n".encode())


def rnd_batch() -> int:
    return random.choice([1, 7, 50, 300])


def purger(path: str, log: str, keep: int) -> None:
    """Purge all but about the last ``keep`` messages, again and again; logs
    ``P upto`` before each purge."""
    from stagger_sqlite import StaggerQueue

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with StaggerQueue(path, timeout=None) as q:
        while True:
            upto = q.last_seq - keep
            if upto > 0:
                os.write(fd, f"P {upto}\n".encode())
                q.purge(upto)
            time.sleep(0.05)


def purged_upto(log: str) -> int:
    """The highest purge bound a purger meant to use (0: none)."""
    if not os.path.exists(log):
        return 0
    with open(log) as f:
        return max([int(line.split()[1]) for line in f if line.startswith("P ") and line.endswith("\n")], default=0)


def member(path: str, log: str, group: str, seed: int, lease: float, wait: object = True) -> None:
    """A group member that logs ``D t seq id`` for each hand-out (``t``: the
    time *before* asking for it, so the hand-out happened after ``t``),
    ``A t seq`` after an explicit ack returned True (``t``: after it
    returned), ``N seq`` after a nack. Messages it simply moves past are
    finished implicitly."""
    from stagger_sqlite import StaggerQueue

    rnd = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with StaggerQueue(path, timeout=None) as q:
        with q.consume(group=group, batch=rnd.choice([1, 5, 20]), lease=lease, max_attempts=10_000, wait=wait) as c:
            it = iter(c)
            while True:
                t = time.time()
                try:
                    seq, msg = next(it)
                except StopIteration:
                    return
                os.write(fd, f"D {t:.6f} {seq} {check_payload(seq, msg)}\n".encode())
                r = rnd.random()
                if r < 0.6:
                    if c.ack(seq):
                        os.write(fd, f"A {time.time():.6f} {seq}\n".encode())
                elif r < 0.7:
                    if c.nack(seq, delay=0):
                        os.write(fd, f"N {seq}\n".encode())


def read_member_logs(paths: List[str]) -> Tuple[Dict[int, List[float]], Dict[int, float], int]:
    """(seq -> times before its hand-outs, seq -> first time an ack of it had
    returned, nacks)."""
    delivered: Dict[int, List[float]] = {}
    acked: Dict[int, float] = {}
    nacks = 0
    for p in paths:
        if not os.path.exists(p):
            continue
        with open(p) as f:
            for line in f:
                if not line.endswith("\n"):
                    continue
                parts = line.split()
                if parts[0] == "D":
                    delivered.setdefault(int(parts[2]), []).append(float(parts[1]))
                elif parts[0] == "A":
                    seq, t = int(parts[2]), float(parts[1])
                    acked[seq] = min(t, acked.get(seq, t))
                elif parts[0] == "N":
                    nacks += 1
    return delivered, acked, nacks


def open_damaged(path: str) -> None:
    """Open a (possibly damaged) queue, read everything, write once; print
    one JSON line: what worked, and the first error (type, message) if any.
    A DecodeError of one message is noted and the reading goes on."""
    from stagger_sqlite import DecodeError, StaggerError, StaggerQueue

    out: Dict[str, object] = {"read": 0, "decode_errors": 0}
    try:
        with StaggerQueue(path, timeout=5) as q:
            c = q.consume(0, wait=False, batch=100)
            while True:
                try:
                    next(c)
                    out["read"] = int(out["read"]) + 1  # type: ignore[call-overload]
                except DecodeError:
                    out["decode_errors"] = int(out["decode_errors"]) + 1  # type: ignore[call-overload]
                except StopIteration:
                    break
            q.write({"after": "damage"})
            out["wrote"] = True
    except StaggerError as e:
        out["error"] = type(e).__name__
        out["message"] = str(e)
    print(json.dumps(out))
