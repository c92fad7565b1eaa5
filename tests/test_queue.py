"""StaggerQueue: seqnos, writes, purge, figures, lifetime, public names (SPEC §1, §2, §5)."""

import pathlib
import threading
import time

import pytest

import stagger_sqlite
from stagger_sqlite import (
    AckOutOfRangeError,
    DecodeError,
    EncodeError,
    LockTimeoutError,
    NotAQueueError,
    QueueClosedError,
    StaggerError,
    StaggerQueue,
    StorageFullError,
)


def test_public_names_are_exactly_the_spec_names_built_so_far():
    spec_names = {
        "StaggerQueue",
        "Consumer",
        "StaggerError",
        "QueueClosedError",
        "LockTimeoutError",
        "EncodeError",
        "DecodeError",
        "AckOutOfRangeError",
        "NotAQueueError",
        "StorageFullError",
        # Built by other issues; listed when present.
        "GroupInfo",
        "DeadLetter",
        "WorkerPool",  # SPEC §7: the pool's Python name is ours to choose
    }
    exported = set(stagger_sqlite.__all__)
    assert len(stagger_sqlite.__all__) == len(exported)
    assert exported <= spec_names
    assert {n for n in spec_names if hasattr(stagger_sqlite, n)} == exported
    for name in exported:
        assert getattr(stagger_sqlite, name) is not None


def test_error_tree():
    for cls in (QueueClosedError, LockTimeoutError, EncodeError, DecodeError, AckOutOfRangeError, NotAQueueError, StorageFullError):
        assert issubclass(cls, StaggerError)
    assert issubclass(LockTimeoutError, TimeoutError)
    assert issubclass(EncodeError, TypeError)
    assert issubclass(AckOutOfRangeError, ValueError)


def test_first_write_is_1_and_seqnos_increase(qpath):
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 0
        assert len(q) == 0
        assert q.write({"order": 17}) == 1
        assert q.write("b") == 2
        assert q.write_many(["c", "d", "e"]) == [3, 4, 5]
        assert q.last_seq == 5
        assert len(q) == 5


def test_reopen_after_3_writes_continues_at_4(qpath):
    with StaggerQueue(qpath) as q:
        assert [q.write(i) for i in range(3)] == [1, 2, 3]
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 3
        assert q.write("x") == 4
        assert [m for _, m in q.consume(wait=False)] == [0, 1, 2, "x"]


def test_purge_everything_then_reopen_never_reuses_seqnos(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(5))
        assert q.purge() == 5
        assert len(q) == 0
        assert q.last_seq == 5
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 5
        assert len(q) == 0
        assert q.write("next") == 6
        assert q.purge() == 1
        assert q.write("again") == 7


def test_write_many_empty_and_generators(qpath):
    with StaggerQueue(qpath) as q:
        assert q.write_many([]) == []
        assert q.write_many(x * 2 for x in range(3)) == [1, 2, 3]
        assert [m for _, m in q.consume(wait=False)] == [0, 2, 4]


def test_purge_upto(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(10))
        assert q.purge(0) == 0
        assert q.purge(3) == 3
        assert q.purge(3) == 0
        assert len(q) == 7
        assert [s for s, _ in q.consume(wait=False)] == list(range(4, 11))
        assert q.purge(100) == 7  # beyond last_seq: everything there is
        assert q.last_seq == 10
        for bad in (-1, 1.5, "3", True):
            with pytest.raises(ValueError):
                q.purge(bad)


def test_stats(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(4))
        q.purge(1)
        s = q.stats()
        assert s["last_seq"] == 4
        assert s["stored"] == 3
        assert s["bytes"] > 0
        assert isinstance(s["groups"], dict)


def test_many_messages_of_20kb_round_trip_in_order(qpath):
    body = bytes(range(256)) * 80  # 20 KB
    n = 10_000
    with StaggerQueue(qpath, codec="raw", durability="normal") as q:
        for start in range(0, n, 500):
            q.write_many(body + i.to_bytes(4, "big") for i in range(start, start + 500))
        assert len(q) == n
        count = 0
        for seq, msg in q.consume(wait=False, batch=200):
            i = seq - 1
            assert msg[-4:] == i.to_bytes(4, "big")
            assert msg[:-4] == body
            count += 1
        assert count == n


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_durability_modes(qpath, durability):
    with StaggerQueue(qpath, durability=durability) as q:
        seq = q.write(1)
        # SQLite itself fsyncs only at checkpoints (synchronous=NORMAL, 1);
        # full: the storage fsyncs the WAL after each commit, before the
        # write returns (durable.py; tests/test_powerloss.py checks the disk).
        level = q._storage.read(lambda c: c.execute("PRAGMA synchronous").fetchall()[0][0])
        assert level == 1
        horizon = q._storage._horizon
        if durability == "full":
            assert horizon.durable_seq == seq
        else:
            assert horizon is None
        mode = q._storage.read(lambda c: c.execute("PRAGMA journal_mode").fetchall()[0][0])
        assert mode == "wal"


@pytest.mark.parametrize("bad", ["FULL", "off", "", None, 1])
def test_bad_durability_is_a_value_error(qpath, bad):
    with pytest.raises(ValueError, match="durability"):
        StaggerQueue(qpath, durability=bad)
    assert not pathlib.Path(qpath).exists()


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), "3", True])
def test_bad_timeout_is_a_value_error(qpath, bad):
    with pytest.raises(ValueError, match="timeout"):
        StaggerQueue(qpath, timeout=bad)
    assert not pathlib.Path(qpath).exists()


@pytest.mark.parametrize("timeout", [None, 0, 0.5, 10, 1e12, float("inf")])
def test_good_timeouts(qpath, timeout):
    with StaggerQueue(qpath, timeout=timeout) as q:
        assert q.write(timeout) == 1


def test_pathlike_path(tmp_path):
    p = tmp_path / "jobs.db"
    with StaggerQueue(p) as q:
        q.write("x")
        assert q.path == str(p)
    with StaggerQueue(str(p)) as q:
        assert q.last_seq == 1


def test_close_is_idempotent_and_use_after_close_raises(qpath):
    q = StaggerQueue(qpath)
    q.write(1)
    c = q.consume(wait=False)
    q.close()
    q.close()
    assert q.closed
    for use in (
        lambda: q.write(1),
        lambda: q.write_many([1]),
        lambda: q.write_many([]),
        lambda: q.last_seq,
        lambda: len(q),
        lambda: q.stats(),
        lambda: q.purge(),
        lambda: q.consume(wait=False),
        lambda: q.__enter__(),
        # the closed queue comes first, before the arguments' own errors
        lambda: q.write(object()),
        lambda: q.write_many([object()]),
        lambda: q.schedule(object(), delay=-1),
        lambda: q.consume(ack=-1),
        lambda: q.consume(group="g", batch=0),
        lambda: q.purge(-1),
    ):
        with pytest.raises(QueueClosedError, match="closed"):
            use()
    assert list(c) == []  # a consumer of a closed queue just ends


def test_context_manager_closes_even_on_error(qpath):
    with pytest.raises(RuntimeError):
        with StaggerQueue(qpath) as q:
            q.write(1)
            raise RuntimeError("boom")
    assert q.closed
    with StaggerQueue(qpath) as q2:
        assert q2.last_seq == 1


def test_two_objects_on_one_file_in_one_process(qpath):
    with StaggerQueue(qpath) as a, StaggerQueue(qpath) as b:
        assert a.write("a") == 1
        assert b.write("b") == 2
        assert a.last_seq == 2
        assert len(b) == 2


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failed_write_leaves_no_transaction_open(qpath, error):
    """A write that raised wrote nothing, released the writer lock, and the
    queue keeps working."""
    Boom = error

    with StaggerQueue(qpath) as q, StaggerQueue(qpath, timeout=1) as other:
        q.write(1)

        def fail(conn):
            conn.execute("INSERT INTO messages (body) VALUES (x'00')")
            raise Boom()

        with pytest.raises(Boom):
            q._storage.write(fail)
        assert not q._storage._connection().in_transaction
        assert len(q) == 1
        assert other.write_many([]) == []
        other.purge(0)  # takes the writer lock: it was released
        assert q.write(2) == 2  # the rolled-back row took no seqno
        assert [m for _, m in q.consume(wait=False)] == [1, 2]


def test_threads_can_close_while_another_writes(qpath):
    """close() racing writes: each write either lands or raises QueueClosedError."""
    q = StaggerQueue(qpath)
    results = []

    def writer():
        for i in range(200):
            try:
                results.append(q.write(i))
            except QueueClosedError:
                results.append(None)
                return

    t = threading.Thread(target=writer)
    t.start()
    q.close()
    t.join(60)
    written = [r for r in results if r is not None]
    with StaggerQueue(qpath) as q2:
        assert q2.last_seq == len(written)
        assert [s for s, _ in q2.consume(wait=False)] == written


def test_a_full_disk_is_storage_full_error_and_writes_nothing(qpath):
    """SQLite's page limit stands in for a full disk: the write raises
    StorageFullError, stores nothing, and writes work again once there is room."""
    with StaggerQueue(qpath, codec="raw") as q:
        q.write(b"kept")
        pages = q._storage.read(lambda c: c.execute("PRAGMA page_count").fetchall()[0][0])
        q._storage.read(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}").fetchall())
        with pytest.raises(StorageFullError, match=qpath):
            q.write_many([b"x" * 100_000] * 3)
        assert q.last_seq == 1 and len(q) == 1
        assert q._storage._connection().in_transaction is False
        q._storage.read(lambda c: c.execute("PRAGMA max_page_count = 1000000").fetchall())
        assert q.write(b"later") == 2
        assert [m for _, m in q.consume(wait=False)] == [b"kept", b"later"]


def test_a_message_beyond_sqlites_size_limit_is_storage_full_error(qpath):
    # (SQLite's limit lowered for the test: the real one is 1e9 bytes)
    import apsw

    with StaggerQueue(qpath, codec="raw") as q:
        q.write(b"kept")
        q._storage._connection().limit(apsw.SQLITE_LIMIT_LENGTH, 1000)
        with pytest.raises(StorageFullError, match="size limit"):
            q.write(b"x" * 2000)
        with pytest.raises(StorageFullError, match=qpath):
            q.write_many([b"small", b"x" * 2000])
        assert (q.last_seq, len(q)) == (1, 1)
        assert q.write(b"small") == 2


@pytest.mark.parametrize("call", [
    lambda q: q.schedule(1, delay=10**400),
    lambda q: q.schedule(1, at=10**400),
    lambda q: q.consume(wait=10**400),
    lambda q: StaggerQueue(q.path, timeout=10**400),
])
def test_numbers_beyond_sqlite_or_float_are_value_errors(qpath, call):
    with StaggerQueue(qpath) as q:
        with pytest.raises(ValueError):
            call(q)
        with pytest.raises(AckOutOfRangeError):  # still the range error, however large
            q.consume(ack=2**70)


def test_bounds_beyond_sqlites_integers_mean_no_bound(qpath):
    """SPEC section 3 names ack < 0, batch < 1 and non-integers as errors; a
    purge point or a batch past SQLite's largest integer is just "all"."""
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "b", "c", "d"])
        assert [s for s, _ in q.consume(batch=2**64, wait=False)] == [1, 2, 3, 4]
        assert [s for s, _ in q.consume(ack=2, purge=10**30, wait=False)] == [3, 4]
        assert len(q) == 2  # purged up to min(purge, ack) = 2
        with q.consume(group="g", batch=2**70, max_attempts=2**70, wait=False) as c:
            assert [s for s, _ in c] == [3, 4]
            assert c.ack(2**80) is False  # never handed out
        assert q.requeue("g", [2**90]) == 0
        assert q.purge(2**63) == 2 and len(q) == 0


def test_purge_everything_takes_due_scheduled_messages_too(qpath):
    # A due entry is a message: purge() removes it like one.
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "b"])
        q.schedule("due", delay=0.05)
        q.schedule("later", delay=3600)
        time.sleep(0.1)  # due now, and no write since: not promoted yet
        assert q.purge() == 3
        assert len(q) == 0 and list(q.consume(wait=False)) == []
        assert q.last_seq == 3  # the due one got its seqno, then went
