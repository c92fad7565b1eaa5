"""``stagger-sqlite check``: the file's integrity and the queue's invariants."""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from . import schema

if TYPE_CHECKING:
    from .queue import StaggerQueue


def check(q: "StaggerQueue") -> List[str]:
    """Return the problems found in ``q``'s file (empty: all is well).

    Checks SQLite's ``integrity_check``, the queue identity and version, that
    no stored seqno is above the seqno high-water mark (which would let seqnos
    be reused), and that no group has finished beyond the last seqno.
    """

    def inspect(conn) -> List[str]:
        problems = [f"integrity: {r[0]}" for r in conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
        app = conn.execute("PRAGMA application_id").fetchall()[0][0]
        if app != schema.APPLICATION_ID:
            problems.append(f"application_id is {app:#x}, not {schema.APPLICATION_ID:#x}")
        version = schema.version_of(conn)
        if version != schema.FORMAT_VERSION:
            problems.append(f"format version {version}, expected {schema.FORMAT_VERSION}")
        high = conn.execute("SELECT max(seq) FROM messages").fetchall()[0][0] or 0
        mark = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchall()
        mark = mark[0][0] if mark else 0
        if high > mark:
            problems.append(f"stored seqno {high} is above the high-water mark {mark}: seqnos could be reused")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        if "deliveries" in tables:
            # A message a group has not finished must still be readable.
            lost = conn.execute(
                "SELECT d.grp, d.seq FROM deliveries d LEFT JOIN messages m ON m.seq = d.seq "
                "WHERE m.seq IS NULL AND d.body IS NULL LIMIT 5"
            ).fetchall()
            for grp, seq in lost:
                problems.append(f"group {grp!r} has not finished seq {seq}, but the message is gone")
        return problems

    problems = q._storage.read(inspect, snapshot=True)
    groups = getattr(q, "groups", None)
    if groups is not None:
        last = q.last_seq
        for name, info in groups().items():
            if info.acked > last:
                problems.append(f"group {name!r} acked {info.acked} beyond last_seq {last}")
            if min(info.in_flight, info.retrying, info.dead) < 0:
                problems.append(f"group {name!r} has negative figures: {info}")
    return problems
