"""The queues under test, each behind the same few verbs.

Every adapter opens its queue in the calling process (multi-process
workloads build their adapters inside the child processes) and offers:

- ``put(msg)``: one message, committed as the system commits by default;
- ``put_many(msgs)``: a batch, as the system's own batch API does it;
- ``take() -> msg | None``: hand out one message to this consumer (competing
  consumers), ``None`` when nothing is there now;
- ``done(token)``: finish what ``take`` handed out (ack), where the system
  has acks;
- ``drain(n)``: iterate over ``n`` stored messages as fast as the system can;
- ``fsync``: whether each commit is fsynced (read from the connection's
  ``PRAGMA synchronous`` where the system uses SQLite).

Peers run in their default modes and with their default serializers (pickle
for persist-queue and diskcache, JSON text for litequeue, whose API takes
``str``); stagger_sqlite and the raw apsw baseline use CBOR.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import apsw
import cbor2

GROUP = "bench"


class RawQueue:
    """The baseline: the least a SQLite queue can do with apsw and cbor2.

    An AUTOINCREMENT table; ``put`` is one ``BEGIN IMMEDIATE`` + INSERT +
    COMMIT; ``take`` deletes and returns the oldest row in one transaction
    (no ack: a crashed consumer loses what it took); ``drain`` is one scan.
    SQLite's busy handler is its only lock.
    """

    label = "raw apsw"

    def __init__(self, path: str, sync: str = "FULL") -> None:
        self.sync = sync
        self.conn = apsw.Connection(path)
        self.conn.set_busy_timeout(60_000)
        self.conn.execute("PRAGMA journal_mode = WAL").fetchall()
        self.conn.execute(f"PRAGMA synchronous = {sync}")
        self.conn.execute("CREATE TABLE IF NOT EXISTS m (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)")
        self.fsync = sync == "FULL"
        self.durability = sync.lower()

    def put(self, msg: Any) -> None:
        body = cbor2.dumps(msg)
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO m (body) VALUES (?)", (body,))
        c.execute("COMMIT")

    def put_many(self, msgs: List[Any]) -> None:
        rows = [(cbor2.dumps(m),) for m in msgs]
        with self.conn:
            self.conn.executemany("INSERT INTO m (body) VALUES (?)", rows)

    def take(self) -> Optional[Tuple[Any, Any]]:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("DELETE FROM m WHERE seq = (SELECT min(seq) FROM m) RETURNING body").fetchall()
        finally:
            c.execute("COMMIT")
        return (cbor2.loads(row[0][0]), None) if row else None

    def done(self, token: Any) -> None:
        pass

    def drain(self, n: int) -> Iterator[Any]:
        for seq, body in self.conn.execute("SELECT seq, body FROM m ORDER BY seq LIMIT ?", (n,)):
            yield cbor2.loads(body)

    def close(self) -> None:
        self.conn.close()


class Stagger:
    """stagger_sqlite. It has no ``take``: competing consumers are members
    of a consumer group (SPEC §4), run as such by ``run.py``."""

    label = "stagger_sqlite"

    def __init__(self, path: str, durability: str = "full", batch: int = 50) -> None:
        from stagger_sqlite import StaggerQueue

        self.q = StaggerQueue(path, durability=durability)
        self.durability = durability
        self.fsync = durability == "full"
        self.batch = batch

    def put(self, msg: Any) -> None:
        self.q.write(msg)

    def put_many(self, msgs: List[Any]) -> None:
        self.q.write_many(msgs)

    def drain(self, n: int) -> Iterator[Any]:
        for i, (seq, msg) in enumerate(self.q.consume(ack=0, batch=self.batch, wait=False)):
            yield msg
            if i + 1 >= n:
                return

    def close(self) -> None:
        self.q.close()


def _sqlite3_fsyncs(conn: Any) -> bool:
    """True when this sqlite3 connection fsyncs the WAL at each commit."""
    return conn.execute("PRAGMA synchronous").fetchall()[0][0] >= 2


class TakeDrain:
    """``drain`` for the peers that only offer take-one (and ack-one): each
    message taken and acked in turn (``done`` is a no-op for peers without
    acks)."""

    def drain(self, n: int) -> Iterator[Any]:
        for _ in range(n):
            item = self.take()  # type: ignore[attr-defined]
            if item is None:
                return
            self.done(item[1])  # type: ignore[attr-defined]
            yield item[0]


class PQAck(TakeDrain):
    """persist-queue ``SQLiteAckQueue`` (pickle; SQLite's default FULL)."""

    label = "persist-queue SQLiteAckQueue"

    def __init__(self, path: str) -> None:
        from persistqueue import SQLiteAckQueue

        self.q = SQLiteAckQueue(path, multithreading=True)
        self.fsync = _sqlite3_fsyncs(self.q._putter)
        self.durability = "default"

    def put(self, msg: Any) -> None:
        self.q.put(msg)

    def put_many(self, msgs: List[Any]) -> None:
        for m in msgs:  # no batch API: auto_commit=True commits each put
            self.q.put(m)

    def take(self) -> Optional[Tuple[Any, Any]]:
        from persistqueue import Empty

        try:
            item = self.q.get(block=False, raw=True)
        except Empty:
            return None
        return item["data"], item["pqid"]

    def done(self, token: Any) -> None:
        self.q.ack(id=token)

    def close(self) -> None:
        self.q.close()


class PQ(TakeDrain):
    """persist-queue ``SQLiteQueue`` (pickle; get deletes; no ack)."""

    label = "persist-queue SQLiteQueue"

    def __init__(self, path: str, auto_commit: bool = True) -> None:
        from persistqueue import SQLiteQueue

        self.q = SQLiteQueue(path, multithreading=True, auto_commit=auto_commit)
        self.fsync = _sqlite3_fsyncs(self.q._putter)
        self.durability = "default"

    def put(self, msg: Any) -> None:
        self.q.put(msg)

    def put_many(self, msgs: List[Any]) -> None:
        # Its documented batch form: auto_commit=False, then task_done()
        # (for SQLite each put still commits: its `with conn` block does).
        self.q.auto_commit = False
        for m in msgs:
            self.q.put(m)
        self.q.task_done()
        self.q.auto_commit = True

    def take(self) -> Optional[Tuple[Any, Any]]:
        from persistqueue import Empty

        try:
            return self.q.get(block=False), None
        except Empty:
            return None

    def done(self, token: Any) -> None:
        pass

    def close(self) -> None:
        self.q.close()


class Lite(TakeDrain):
    """litequeue (JSON text; synchronous NORMAL; pop locks, done finishes)."""

    label = "litequeue"

    def __init__(self, path: str) -> None:
        from litequeue import LiteQueue

        self.q = LiteQueue(os.path.join(path, "lq.db") if os.path.isdir(path) else path)
        self.fsync = _sqlite3_fsyncs(self.q.conn)
        self.durability = "default"

    def put(self, msg: Any) -> None:
        self.q.put(json.dumps(msg))

    def put_many(self, msgs: List[Any]) -> None:
        with self.q.transaction(mode="IMMEDIATE"):
            for m in msgs:
                self.q.put(json.dumps(m))

    def take(self) -> Optional[Tuple[Any, Any]]:
        m = self.q.pop()
        if m is None:
            return None
        return json.loads(m.data), m.message_id

    def done(self, token: Any) -> None:
        self.q.done(token)

    def close(self) -> None:
        self.q.close()


class DCDeque(TakeDrain):
    """diskcache ``Deque`` (pickle; synchronous NORMAL; no ack)."""

    label = "diskcache Deque"

    def __init__(self, path: str) -> None:
        from diskcache import Deque

        self.q = Deque(directory=path)
        self.fsync = self.q._cache.sqlite_synchronous >= 2
        self.durability = "default"

    def put(self, msg: Any) -> None:
        self.q.append(msg)

    def put_many(self, msgs: List[Any]) -> None:
        self.q.extend(msgs)

    def take(self) -> Optional[Tuple[Any, Any]]:
        try:
            return self.q.popleft(), None
        except IndexError:
            return None

    def done(self, token: Any) -> None:
        pass

    def close(self) -> None:
        self.q._cache.close()


#: name -> (factory(path) -> adapter, True when the path is a directory).
FACTORIES: Dict[str, Tuple[Callable[[str], Any], bool]] = {
    "raw-full": (lambda p: RawQueue(p, "FULL"), False),
    "raw-normal": (lambda p: RawQueue(p, "NORMAL"), False),
    "stagger-full": (lambda p: Stagger(p, "full"), False),
    "stagger-normal": (lambda p: Stagger(p, "normal"), False),
    "pq-ack": (PQAck, True),
    "pq": (PQ, True),
    "litequeue": (Lite, False),
    "diskcache": (DCDeque, True),
}

PEERS = ("pq-ack", "pq", "litequeue", "diskcache")

LABELS = {
    "raw-full": "raw apsw (FULL)",
    "raw-normal": "raw apsw (NORMAL)",
    "stagger-full": "stagger_sqlite full",
    "stagger-normal": "stagger_sqlite normal",
    "pq-ack": "persist-queue SQLiteAckQueue",
    "pq": "persist-queue SQLiteQueue",
    "litequeue": "litequeue",
    "diskcache": "diskcache Deque",
}


def available(name: str) -> Optional[str]:
    """None when the system can run here, else why not."""
    module = {"pq-ack": "persistqueue", "pq": "persistqueue", "litequeue": "litequeue", "diskcache": "diskcache"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return f"{module} is not installed"
    return None


def open_system(name: str, path: str) -> Any:
    """Open system ``name`` at ``path`` (a file, or a directory for the peers
    that want one; created if missing)."""
    factory, is_dir = FACTORIES[name]
    if is_dir:
        os.makedirs(path, exist_ok=True)
    return factory(path)
