"""The queue file's format: identity, DDL, format version, per-connection pragmas.

A queue file is a SQLite database in WAL mode whose header carries our
``application_id`` and whose ``user_version`` is the format version. Both live
in the 100-byte header, so a file can be recognised (or refused) by reading
those bytes, before SQLite is ever pointed at it: opening never alters a file
that is not a queue.
"""

from __future__ import annotations

import operator
import os
import struct
from typing import Dict, List

import apsw

from .errors import NotAQueueError, StaggerError

#: ``PRAGMA application_id`` of every queue file: b"STGQ".
APPLICATION_ID = 0x53544751

#: The format this release writes. A file with a higher version is refused;
#: a lower one is migrated (under the writer lock) by the steps below.
FORMAT_VERSION = 1

SQLITE_MAGIC = b"SQLite format 3\x00"

# Format 1. Nothing is released yet, so this list may still grow in place;
# after the first release, changes go into MIGRATIONS[2], [3] ...
DDL_V1: List[str] = [
    # AUTOINCREMENT, not a plain INTEGER PRIMARY KEY: by default SQLite may
    # reuse the highest rowid once it is deleted, so purging everything would
    # hand out seqnos again and a consumer resuming from its ack point would
    # silently skip the new messages. With AUTOINCREMENT the high-water mark
    # lives in sqlite_sequence and survives any purge and any reopen.
    """CREATE TABLE messages (
        seq  INTEGER PRIMARY KEY AUTOINCREMENT,
        body BLOB NOT NULL
    )""",
    # Delayed messages: not yet messages. They get a seqno when promoted.
    """CREATE TABLE scheduled (
        id   INTEGER PRIMARY KEY AUTOINCREMENT,
        due  REAL NOT NULL,
        body BLOB NOT NULL
    )""",
    "CREATE INDEX scheduled_due ON scheduled (due, id)",
    # Small named settings shared by every process (pause flags, rate limits).
    """CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value
    ) WITHOUT ROWID""",
    # Consumer groups (groups.py). `cursor`: every seq <= cursor has been
    # handed out at least once (new messages are those above it); `token`:
    # the last claim token issued, one per claim, so a late ack from a former
    # holder of a message never matches the row of its new holder.
    """CREATE TABLE groups (
        name    TEXT PRIMARY KEY,
        cursor  INTEGER NOT NULL,
        token   INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    ) WITHOUT ROWID""",
    # A group's messages between their first hand-out and their finish (ack
    # or dead letter): finishing deletes the row, so the table stays as small
    # as what is in flight or waiting. `state`: 0 claimed in a batch, 1
    # claimed alone, 2 waiting, 3 waiting and to be handed out alone (it was
    # in a batch whose member died). `ready`: lease deadline (0, 1) or due
    # time (2, 3): the row is claimable once ready <= now, whatever its state.
    # `body`: only for requeued dead letters, whose message may be purged.
    """CREATE TABLE deliveries (
        grp      TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        state    INTEGER NOT NULL,
        token    INTEGER NOT NULL,
        ready    REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error    TEXT,
        body     BLOB,
        PRIMARY KEY (grp, seq)
    ) WITHOUT ROWID""",
    # "Next claimable": due redeliveries in the order they became due.
    "CREATE INDEX deliveries_ready ON deliveries (grp, ready)",
    # Dead letters keep their own copy of the body: they count as finished,
    # so purge may remove the message itself.
    """CREATE TABLE dead_letters (
        grp      TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        body     BLOB NOT NULL,
        attempts INTEGER NOT NULL,
        error    TEXT,
        at       REAL NOT NULL,
        PRIMARY KEY (grp, seq)
    )""",
]

#: Steps from version n-1 to n, run in one write transaction each.
MIGRATIONS: Dict[int, List[str]] = {}

#: Tables a file must have to be taken for a queue.
REQUIRED_TABLES = frozenset({"messages", "scheduled", "settings", "groups", "deliveries", "dead_letters"})


def read_header(path: str) -> bytes:
    """The first 100 bytes of ``path`` (fewer if the file is shorter)."""
    with open(path, "rb") as f:
        return f.read(100)


def check_header(path: str, header: bytes) -> None:
    """Refuse a non-empty file that is not a queue of a format we know.

    Raises:
        NotAQueueError: not SQLite, a SQLite file of another application, or a
            newer format version.
    """
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise NotAQueueError(f"{path} is not a SQLite file, so not a stagger_sqlite queue")
    user_version, application_id = struct.unpack(">I4xI", header[60:72])
    if application_id != APPLICATION_ID:
        raise NotAQueueError(
            f"{path} is a SQLite database of another application (application_id={application_id:#x}), "
            "not a stagger_sqlite queue"
        )
    check_version(path, user_version)


def check_version(path: str, version: int) -> None:
    """Raises NotAQueueError when ``version`` is newer than this release
    knows, or below 1 (every queue file was made with a version)."""
    if version < 1:
        raise NotAQueueError(f"{path} carries the queue identity but no format version ({version}): not a queue")
    if version > FORMAT_VERSION:
        raise NotAQueueError(
            f"{path} has queue format version {version}; this release of stagger_sqlite "
            f"reads versions up to {FORMAT_VERSION}: upgrade stagger_sqlite"
        )


def build(conn: apsw.Connection) -> None:
    """Create the schema in an empty database (``conn`` is not yet in WAL mode).

    ``auto_vacuum`` must be chosen before the first table exists: INCREMENTAL
    lets purge hand free pages back to the OS a slice at a time, with no
    blocking full VACUUM.
    """
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    with conn:
        for stmt in DDL_V1:
            conn.execute(stmt)
        for version in range(2, FORMAT_VERSION + 1):
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
    conn.execute("PRAGMA journal_mode = WAL")


SQL_LAST_SEQ = "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"


def last_seq(conn: apsw.Connection) -> int:
    """The highest seqno ever assigned (0 for a new queue)."""
    row = conn.execute(SQL_LAST_SEQ).fetchall()
    return row[0][0] if row else 0


def version_of(conn: apsw.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchall()[0][0]


def check_tables(conn: apsw.Connection, path: str) -> None:
    """Raises NotAQueueError when the file lacks the queue tables."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
    missing = REQUIRED_TABLES - names
    if missing:
        raise NotAQueueError(f"{path} carries the queue identity but lacks tables {sorted(missing)}: not a queue")


def migrate(conn: apsw.Connection, from_version: int) -> None:
    """Bring a file up to FORMAT_VERSION. The caller holds the writer lock."""
    for version in range(from_version + 1, FORMAT_VERSION + 1):
        with conn:
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {version}")


# -- per-connection settings, one function each (after apsw.bestpractice) --

#: WAL bytes kept on disk after a checkpoint resets it. Without a limit the
#: WAL file keeps the size of its largest burst forever.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024


def connection_durability(conn: apsw.Connection, durability: str) -> None:
    """SQLite's ``synchronous = NORMAL`` for both: no fsync inside a commit,
    fsyncs at checkpoints (survives any process crash). For ``full`` the
    storage fsyncs the WAL itself after each commit, out of the locks, before
    the write returns (durable.py): the same promise as SQLite's FULL."""
    conn.execute("PRAGMA synchronous = NORMAL")


def connection_wal_limits(conn: apsw.Connection) -> None:
    """Bound the WAL: checkpoint every ~1000 pages, truncate back to the limit."""
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    conn.execute("PRAGMA wal_autocheckpoint = 1000")


def connection_no_checkpoint_on_close(conn: apsw.Connection) -> None:
    """Closing a connection (at fork, at close) must be cheap and must not race
    other processes for the WAL: leave checkpoints to the running writers."""
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)


def connection_busy_timeout(conn: apsw.Connection, ms: int) -> None:
    """SQLite's own wait, only a fallback: our writers queue on the writer lock
    first, so SQLite's sleeping busy handler matters only against programs that
    write the file without it."""
    conn.set_busy_timeout(ms)


_SEQ = operator.itemgetter(0)


def check_run(conn: apsw.Connection, path: str, after: int, rows: List[tuple]) -> None:
    """Check that ``rows`` (``seq`` first, read by ``seq > after ORDER BY seq``)
    continue the stored messages without a hole.

    Stored messages are always one contiguous run of seqnos: writes append,
    purge removes a prefix, and a rolled-back write rolls back its seqnos too.
    So a page with a hole, or a page that starts past ``after + 1`` while
    older messages are still stored, can only come from a damaged file (SQLite
    keeps no page checksums; a misplaced page reads as valid rows). Without
    this check a consumer would skip messages silently, or go round forever
    when the damage sends ``seq`` backwards. Every seqno of the page is
    compared (about 40 ns a row): a misplaced page that holds as many rows
    as the one it replaced keeps the page's first and last seqnos and its
    length plausible. One more indexed query only when a page starts with a
    jump (after a purge).

    Raises:
        StaggerError: the file is damaged, naming the path and the seqnos.
    """
    if not rows:
        return
    first, last = rows[0][0], rows[-1][0]
    if first > after and list(map(_SEQ, rows)) == list(range(first, first + len(rows))):
        if first == after + 1:
            return
        lowest = conn.execute("SELECT min(seq) FROM messages").fetchall()[0][0]
        if lowest is None or lowest >= first:
            return  # everything between was purged
    raise StaggerError(
        f"{path} is damaged: reading after seq {after} gave seqnos {first}..{last} in {len(rows)} rows, "
        f"not a contiguous run; `stagger-sqlite check {path}` reports what is readable"
    )


def file_bytes(path: str) -> int:
    """Bytes on disk of the queue file plus its WAL."""
    total = 0
    for p in (path, path + "-wal"):
        try:
            total += os.stat(p).st_size
        except FileNotFoundError:
            pass
    return total
