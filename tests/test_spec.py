"""SPEC conformance: one small test per promise of SPEC.md, in SPEC order.

Written as an outside tester would: only public names (``from stagger_sqlite
import ...``) and the command line through ``python -m stagger_sqlite``, with
the argument names, keyword-only-ness, defaults and return types the SPEC
gives. Deeper tests of each feature live in the per-module test files.
"""

import asyncio
import datetime
import decimal
import http.client
import inspect
import json
import multiprocessing
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import filelock
import pytest

import stagger_sqlite
from stagger_sqlite import (
    AckOutOfRangeError,
    Consumer,
    DeadLetter,
    DecodeError,
    EncodeError,
    GroupInfo,
    LockTimeoutError,
    NotAQueueError,
    QueueClosedError,
    StaggerError,
    StaggerQueue,
    StorageFullError,
    WorkerPool,
)

from .helpers import wait_for

CLI = [sys.executable, "-m", "stagger_sqlite"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UTC = datetime.timezone.utc


def cli(*args, input=None, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], input=input, capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def params(fn):
    return inspect.signature(fn).parameters


def assert_one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- targets of child processes (importable: tests.test_spec) ------------------


def write_in_child(path, msgs):
    with StaggerQueue(path) as q:
        q.write_many(msgs)


def write_after_fork(q, conn):
    conn.send(q.write("from child"))


def take_one_and_die(path):
    q = StaggerQueue(path)
    c = q.consume(group="g", batch=5, lease=0.5)
    next(c)
    os.kill(os.getpid(), signal.SIGKILL)


def slow_handler(msg):
    time.sleep(0.05)


def spec_handler(msg):
    """Handler of the §7 test: fails for "bad"."""
    if msg == "bad":
        raise RuntimeError("bad message")


# -- §1 The queue file ---------------------------------------------------------


def test_s1_constructor_signature():
    p = params(StaggerQueue)
    assert list(p)[0] == "path"
    assert p["path"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    expected = {"codec": "cbor", "durability": "full", "timeout": 30.0, "mode": 0o600}
    for name, default in expected.items():
        assert p[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p[name].default == default, name
    with pytest.raises(TypeError):
        StaggerQueue("x.db", "json")  # codec is keyword-only


def test_s1_creates_file_and_is_a_context_manager(tmp_path):
    path = tmp_path / "jobs.db"  # os.PathLike
    with StaggerQueue(path) as q:
        assert q.write({"order": 17}) == 1
    assert path.exists()
    with StaggerQueue(str(path)) as q:  # str
        assert list(q.consume(wait=False)) == [(1, {"order": 17})]


def test_s1_wal_mode_and_sidecar_files(qpath):
    with StaggerQueue(qpath) as q:
        q.write(1)
        assert os.path.exists(qpath + ".lock")
        assert os.path.exists(qpath + "-wal") and os.path.exists(qpath + "-shm")
        db = sqlite3.connect(qpath)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            db.close()


def test_s1_writers_hold_a_filelock_compatible_flock(qpath):
    with StaggerQueue(qpath, timeout=0.2) as q:
        q.write("before")
        lock = filelock.FileLock(qpath + ".lock")
        with lock:  # another tool coordinating with writers
            with pytest.raises(LockTimeoutError):
                q.write("blocked")
        assert q.write("after") == 2  # the failed write took no seqno
        assert [m for _, m in q.consume(wait=False)] == ["before", "after"]


def test_s1_newer_format_version_is_refused_and_untouched(qpath):
    StaggerQueue(qpath).close()
    db = sqlite3.connect(qpath)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    db.execute(f"PRAGMA user_version = {version + 1}")
    db.commit()
    db.close()
    before = open(qpath, "rb").read()
    with pytest.raises(NotAQueueError):
        StaggerQueue(qpath)
    assert open(qpath, "rb").read() == before


def test_s1_opening_never_alters_a_file_that_is_not_a_queue(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a database\n" * 100)
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    for path in (text, other):
        before = path.read_bytes()
        with pytest.raises(NotAQueueError, match=re.escape(path.name)):
            StaggerQueue(path)
        assert path.read_bytes() == before
    with pytest.raises(NotAQueueError):
        StaggerQueue(tmp_path)  # a directory


def test_s1_close_is_idempotent_and_use_after_close_raises(qpath):
    q = StaggerQueue(qpath)
    q.write(1)
    q.close()
    q.close()
    for use in (lambda: q.write(2), lambda: q.write_many([2]), lambda: q.last_seq, lambda: len(q),
                lambda: q.consume(), lambda: q.purge(), lambda: q.stats(), lambda: q.groups(),
                lambda: q.schedule(1, delay=1)):
        with pytest.raises(QueueClosedError):
            use()


def test_s1_durability_values(qpath):
    for durability in ("full", "normal"):
        with StaggerQueue(qpath, durability=durability) as q:
            q.write(durability)
    for bad in ("off", "FULL", None, 1):
        with pytest.raises(ValueError):
            StaggerQueue(qpath, durability=bad)


def test_s1_timeout_none_waits_forever(qpath):
    with StaggerQueue(qpath, timeout=None) as q:
        assert q.write(1) == 1


def test_s1_mode_default_owner_only_and_applies_to_the_lock_file(tmp_path):
    default = str(tmp_path / "a.db")
    with StaggerQueue(default) as q:
        q.write(1)
    for p in (default, default + ".lock"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    shared = str(tmp_path / "b.db")
    with StaggerQueue(shared, mode=0o640) as q:
        q.write(1)
    for p in (shared, shared + ".lock"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, p


def test_s1_one_object_shared_by_threads(qpath):
    with StaggerQueue(qpath) as q:
        seqs = []

        def produce():
            for i in range(50):
                seqs.append(q.write(i))

        threads = [threading.Thread(target=produce) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(seqs) == list(range(1, 201))
        assert len(q) == 200


def test_s1_queue_opened_before_fork_works_in_the_child(qpath):
    with StaggerQueue(qpath) as q:
        q.write("parent")
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=write_after_fork, args=(q, child_end))
        p.start()
        assert parent_end.poll(60)
        assert parent_end.recv() == 2
        p.join(60)
        assert p.exitcode == 0
        assert q.write("parent again") == 3
        assert [m for _, m in q.consume(wait=False)] == ["parent", "from child", "parent again"]


# -- §2 Writing ------------------------------------------------------------------


def test_s2_write_and_write_many_return_types(qpath):
    with StaggerQueue(qpath) as q:
        seq = q.write("a")
        assert type(seq) is int and seq == 1
        seqs = q.write_many(["b", "c", "d"])
        assert isinstance(seqs, list) and seqs == [2, 3, 4]
        assert q.write_many(iter(["e"])) == [5]
        assert q.write_many([]) == []


def test_s2_write_many_is_all_or_none(qpath):
    with StaggerQueue(qpath) as q:
        q.write(0)
        with pytest.raises(EncodeError):
            q.write_many([1, 2, object(), 4])
        assert q.last_seq == 1 and len(q) == 1


def test_s2_seqnos_never_reused_after_purge_and_reopen(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many([1, 2, 3])
        assert q.purge() == 3
        assert len(q) == 0 and q.last_seq == 3
    with StaggerQueue(qpath) as q:
        assert q.write(4) == 4


def test_s2_last_seq_and_len_include_other_processes(qpath):
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 0 and len(q) == 0
        q.write("mine")
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=write_in_child, args=(qpath, ["a", "b"]))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert q.last_seq == 3
        assert len(q) == 3
        q.purge(1)
        assert len(q) == 2 and q.last_seq == 3


def test_s2_encode_error_is_a_type_error_and_writes_nothing(qpath):
    with StaggerQueue(qpath) as q:
        for bad in (object(), datetime.datetime(2024, 1, 1)):  # naive datetime
            with pytest.raises(EncodeError) as e:
                q.write(bad)
            assert isinstance(e.value, TypeError)
        assert q.last_seq == 0


def test_s2_cbor_round_trips_the_listed_types(qpath):
    values = [None, True, False, 0, -(2 ** 70), 1.5, "texte", b"\x00\xff", [1, [2]], (1, 2),
              {"a": {"b": [1]}}, datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), datetime.date(2024, 5, 6),
              decimal.Decimal("1.10"), uuid.UUID(int=7), {1, 2, 3}]
    with StaggerQueue(qpath) as q:
        q.write_many(values)
        got = [m for _, m in q.consume(wait=False)]
    expected = [list(v) if isinstance(v, tuple) else v for v in values]
    assert got == expected


def test_s2_codec_is_not_stored_raw_returns_bytes(qpath):
    with StaggerQueue(qpath, codec="json") as q:
        q.write({"a": 1})
    with StaggerQueue(qpath, codec="raw") as q:
        (seq, msg), = q.consume(wait=False)
        assert type(msg) is bytes and json.loads(msg) == {"a": 1}
        assert q.write(bytearray(b"xy")) == 2
        assert q.write(memoryview(b"z")) == 3
        assert [m for _, m in q.consume(ack=1, wait=False)] == [b"xy", b"z"]
        with pytest.raises(EncodeError):
            q.write("not bytes")


def test_s2_json_codec(qpath):
    with StaggerQueue(qpath, codec="json") as q:
        q.write({"n": [1, "two", None, True, 2.5]})
        assert list(q.consume(wait=False)) == [(1, {"n": [1, "two", None, True, 2.5]})]
        with pytest.raises(EncodeError):
            q.write(b"bytes are not JSON")


def test_s2_custom_codec_object(qpath):
    class Upper:
        def dumps(self, obj):
            return obj.upper().encode()

        def loads(self, data):
            return "decoded:" + data.decode()

    with StaggerQueue(qpath, codec=Upper()) as q:
        q.write("hello")
        assert list(q.consume(wait=False)) == [(1, "decoded:HELLO")]


def test_s2_decode_error_names_the_seqno(qpath):
    with StaggerQueue(qpath, codec="raw") as q:
        q.write(b'"fine"')
        q.write(b"\xff not json")
    with StaggerQueue(qpath, codec="json") as q:
        c = q.consume(wait=False)
        assert next(c) == (1, "fine")
        with pytest.raises(DecodeError, match=r"\b2\b") as e:
            next(c)
        assert isinstance(e.value, StaggerError)


def test_s2_schedule_with_delay(qpath):
    with StaggerQueue(qpath) as q:
        entry = q.schedule({"later": 1}, delay=0.2)
        assert type(entry) is int
        assert q.last_seq == 0  # not a message yet
        c = q.consume(wait=30.0)
        assert next(c) == (1, {"later": 1})
        c.close()


def test_s2_a_due_scheduled_message_counts_without_a_consumer(qpath):
    with StaggerQueue(qpath) as q:
        q.schedule("soon", delay=0.1)
        assert (q.last_seq, len(q)) == (0, 0)
        wait_for(lambda: q.last_seq == 1, 30, message="the entry promoted")
        assert len(q) == 1 and q.stats()["stored"] == 1
        assert list(q.consume(wait=False)) == [(1, "soon")]


def test_s2_schedule_at_aware_datetime_and_epoch_seconds(qpath):
    with StaggerQueue(qpath) as q:
        q.schedule("dt", at=datetime.datetime.now(UTC) - datetime.timedelta(seconds=1))
        q.schedule("epoch", at=time.time() - 1)
        q.schedule("int epoch", at=int(time.time()) - 1)
        q.schedule("future", at=datetime.datetime.now(UTC) + datetime.timedelta(hours=1))
        assert sorted(m for _, m in q.consume(wait=False)) == ["dt", "epoch", "int epoch"]


def test_s2_schedule_argument_errors(qpath):
    with StaggerQueue(qpath) as q:
        with pytest.raises(ValueError):
            q.schedule("x", at=datetime.datetime.now())  # naive
        with pytest.raises(ValueError):
            q.schedule("x")
        with pytest.raises(ValueError):
            q.schedule("x", delay=1, at=time.time())
        with pytest.raises(TypeError):
            q.schedule("x", 1)  # delay is keyword-only
        assert q.stats()["last_seq"] == 0


# -- §3 Consuming from an ack point ---------------------------------------------


def test_s3_consume_signature():
    p = params(StaggerQueue.consume)
    assert p["ack"].default == 0 and p["ack"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    expected = {"batch": 50, "purge": None, "wait": True, "group": None, "lease": 30.0, "max_attempts": 5}
    for name, default in expected.items():
        assert p[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p[name].default == default, name


def test_s3_yields_messages_after_ack_ascending(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(10))
        c = q.consume(3, batch=2, wait=False)
        assert isinstance(c, Consumer)
        assert list(c) == [(s, s - 1) for s in range(4, 11)]
        assert list(q.consume(ack=10, wait=False)) == []


def test_s3_wait_seconds_stops_after_that_long_idle(qpath):
    with StaggerQueue(qpath) as q:
        q.write(1)
        start = time.monotonic()
        assert list(q.consume(wait=0.3)) == [(1, 1)]
        assert time.monotonic() - start >= 0.3


def test_s3_wait_true_wakes_for_another_process(qpath):
    with StaggerQueue(qpath) as q:
        c = q.consume()
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=write_in_child, args=(qpath, ["woke"]))
        p.start()
        assert next(c) == (1, "woke")
        p.join(60)
        c.close()


def test_s3_purge_before_first_message_up_to_min_of_purge_and_ack(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(10))
        c = q.consume(ack=4, purge=8, wait=False)
        assert len(q) == 6  # seq <= min(8, 4) removed
        assert next(c)[0] == 5
        q.consume(ack=9, purge=6, wait=False)
        assert len(q) == 4  # seq <= min(6, 9)


def test_s3_purged_messages_are_skipped_silently(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(5))
        q.purge(3)
        assert [s for s, _ in q.consume(wait=False)] == [4, 5]


def test_s3_argument_errors(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many([1, 2])
        for kwargs in ({"ack": -1}, {"batch": 0}, {"ack": 1.0}, {"ack": True}, {"ack": "1"},
                       {"batch": 2.0}, {"batch": True}, {"purge": -1}, {"wait": "yes"}, {"wait": -1}):
            with pytest.raises(ValueError):
                q.consume(**kwargs)
        with pytest.raises(AckOutOfRangeError) as e:
            q.consume(ack=3)
        assert isinstance(e.value, ValueError)
        q.purge()
        q.consume(ack=2, wait=False)  # purged, but written: in range


def test_s3_many_consumers_each_see_every_message(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(20))
        a, b = q.consume(wait=False), q.consume(wait=False)
        assert list(a) == list(b) == [(s, s - 1) for s in range(1, 21)]


@pytest.mark.parametrize("group", [None, "g"])
def test_s3_close_from_another_thread_ends_a_waiting_consumer_quietly(qpath, group):
    q = StaggerQueue(qpath)
    got = []
    c = q.consume(group=group)

    def loop():
        for item in c:
            got.append(item)
        got.append("ended")

    t = threading.Thread(target=loop)
    t.start()
    q.write("one")
    wait_for(lambda: got, message="the message")
    q.close()
    t.join(30)
    assert not t.is_alive()
    assert got == [(1, "one"), "ended"]


def test_s3_purge_signature():
    p = params(StaggerQueue.purge)
    assert p["upto"].default is None


def test_s3_purge_returns_count_and_spares_unfinished_group_messages(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(10))
        c = q.consume(group="g", batch=1, wait=False)
        for _ in range(4):
            next(c)  # 1..3 finished, 4 in hand
        removed = q.purge(8)
        assert type(removed) is int and removed == 3
        c.close()  # finishes 4
        assert q.purge() == 1
        assert len(q) == 6


# -- §4 Consumer groups ---------------------------------------------------------


def test_s4_group_sees_every_message_after_ack_at_creation_and_ignores_ack_later(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(5))
        with q.consume(group="g", ack=2, wait=False) as c:
            assert isinstance(c, Consumer)  # SPEC: consume(...) -> Consumer, group or not
            assert [s for s, _ in c] == [3, 4, 5]
        q.write(5)
        with q.consume(group="g", ack=0, wait=False) as c:  # existing: ack ignored
            assert [s for s, _ in c] == [6]
        with q.consume(group="other", wait=False) as c:  # independent
            assert [s for s, _ in c] == [1, 2, 3, 4, 5, 6]


def test_s4_ack_beyond_last_seq_is_out_of_range_for_groups_too(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many([1, 2])
        with pytest.raises(AckOutOfRangeError):
            q.consume(group="new", ack=3)
        q.consume(group="old", wait=False).close()
        with pytest.raises(AckOutOfRangeError):
            q.consume(group="old", ack=3)
        assert set(q.groups()) == {"old"}


def test_s4_purge_with_a_group_never_beyond_what_it_finished(qpath):
    # Reading chosen: with `group`, `purge=m` removes seq <= m (a group's `ack`
    # is only its start point), capped by what every group has finished.
    with StaggerQueue(qpath) as q:
        q.write_many(range(10))
        with q.consume(group="g", wait=False) as c:
            for seq, _ in c:
                if seq == 6:
                    break
        assert q.groups()["g"].acked == 6
        q.consume(group="g", purge=8, wait=False).close()
        assert len(q) == 4
        assert [s for s, _ in q.consume(group="g", wait=False)] == [7, 8, 9, 10]


def test_s4_method_signatures(qpath):
    p = params(StaggerQueue.dead_letters)
    assert list(p)[1:] == ["group"]
    p = params(StaggerQueue.requeue)
    assert list(p)[1:] == ["group", "seqs"] and p["seqs"].default is None
    with StaggerQueue(qpath) as q:
        c = q.consume(group="g")
        p = params(c.nack)
        assert p["delay"].kind is p["error"].kind is inspect.Parameter.KEYWORD_ONLY
        assert p["delay"].default is None and p["error"].default is None
        assert list(params(c.ack)) == ["seq"]
        c.close()


def test_s4_members_compete(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(100))
        seen = []

        def member():
            with q.consume(group="g", batch=7, wait=False) as c:
                for seq, _ in c:
                    seen.append(seq)

        threads = [threading.Thread(target=member) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(seen) == list(range(1, 101))
        assert q.groups()["g"].acked == 100


def test_s4_explicit_ack_and_nack_return_bool(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "b"])
        with q.consume(group="g", wait=False) as c:
            seq, _ = next(c)
            assert c.ack(seq) is True
            assert c.ack(seq) is False  # already finished
            seq, _ = next(c)
            assert c.nack(seq, delay=0, error="later") is True
            assert c.nack(seq) is False
            assert next(c) == (2, "b")  # delivered again
        with pytest.raises(TypeError):
            c.nack(2, 0)  # delay is keyword-only
        assert q.groups()["g"].acked == 2


def test_s4_exception_in_the_loop_body_nacks_with_its_text(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(["x", "y", "z"])
        with pytest.raises(RuntimeError):
            with q.consume(group="g", batch=3, max_attempts=1, wait=False) as c:
                for seq, msg in c:
                    raise RuntimeError("smtp down")
        dead = q.dead_letters("g")
        assert [(d.seq, d.msg, d.attempts, d.error) for d in dead] == [(1, "x", 1, "smtp down")]
        assert isinstance(dead[0], DeadLetter)
        with q.consume(group="g", wait=False) as c:  # the rest was released at once
            assert [s for s, _ in c] == [2, 3]


def test_s4_expired_lease_redelivers_and_fences_the_old_member(qpath):
    with StaggerQueue(qpath) as q:
        q.write("job")
        old = q.consume(group="g", lease=0.3, wait=False)
        assert next(old) == (1, "job")
        new = q.consume(group="g", lease=30.0, wait=30.0)
        assert next(new) == (1, "job")  # after the lease expired
        assert old.ack(1) is False
        assert old.nack(1) is False
        old.close()  # never raises for a lost lease
        assert q.groups()["g"].in_flight == 1
        assert new.ack(1) is True
        new.close()
        assert q.groups()["g"].acked == 1


def test_s4_a_dead_member_loses_nothing(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(5))
        p = multiprocessing.get_context("spawn").Process(target=take_one_and_die, args=(qpath,))
        p.start()
        p.join(60)
        assert p.exitcode == -signal.SIGKILL
        assert q.groups()["g"].in_flight == 5  # claimed by the dead member
        got = set()
        with q.consume(group="g", wait=60.0) as c:
            for seq, _ in c:
                got.add(seq)
                if len(got) == 5:
                    break
        assert got == {1, 2, 3, 4, 5}
        assert q.groups()["g"].acked == 5


def test_s4_dead_letters_and_requeue(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(["ok", "poison"])
        with q.consume(group="g", max_attempts=2, wait=False) as c:
            for seq, msg in c:
                if msg == "poison":
                    c.nack(seq, delay=0, error=f"failed {seq}")
        info = q.groups()["g"]
        assert (info.dead, info.acked, info.in_flight, info.retrying, info.lag) == (1, 2, 0, 0, 0)
        dead = q.dead_letters("g")
        assert isinstance(dead, list)
        assert [(d.seq, d.msg, d.attempts, d.error) for d in dead] == [(2, "poison", 2, "failed 2")]
        assert q.purge() == 2  # a dead letter counts as finished; it keeps its copy
        assert q.dead_letters("g")[0].msg == "poison"
        assert q.requeue("g") == 1
        assert q.requeue("g", [2]) == 0
        with q.consume(group="g", wait=False) as c:
            assert list(c) == [(2, "poison")]
        assert q.dead_letters("g") == []


def test_s4_retrying_counts_nacked_messages(qpath):
    with StaggerQueue(qpath) as q:
        q.write("m")
        with q.consume(group="g", wait=False) as c:
            seq, _ = next(c)
            assert q.groups()["g"].in_flight == 1
            c.nack(seq, delay=3600)
            assert q.groups()["g"].retrying == 1
            assert list(c) == []  # wait=False: nothing claimable now


def test_s4_a_waiting_member_wakes_for_a_due_retry_without_a_write(qpath):
    with StaggerQueue(qpath) as q:
        q.write("m")
        with q.consume(group="g", wait=30.0) as c:
            seq, _ = next(c)
            c.nack(seq, delay=0.2)
            assert next(c) == (1, "m")


def test_s4_groups_and_stats_shapes(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(3))
        with q.consume(group="g", wait=False) as c:
            next(c)
        groups = q.groups()
        assert isinstance(groups, dict) and isinstance(groups["g"], GroupInfo)
        info = groups["g"]
        assert (info.acked, info.in_flight, info.retrying, info.lag, info.dead) == (1, 0, 0, 2, 0)
        stats = q.stats()
        assert stats["last_seq"] == 3 and stats["stored"] == 3
        assert stats["bytes"] >= os.path.getsize(qpath) > 0
        g = stats["groups"]["g"]
        assert isinstance(g, dict)
        assert {k: g[k] for k in ("acked", "in_flight", "retrying", "lag", "dead")} == {
            "acked": 1, "in_flight": 0, "retrying": 0, "lag": 2, "dead": 0}
        json.dumps(stats)


# -- §5 Errors -----------------------------------------------------------------


def test_s5_error_tree():
    for cls in (QueueClosedError, LockTimeoutError, EncodeError, DecodeError, AckOutOfRangeError, NotAQueueError,
                StorageFullError):
        assert issubclass(cls, StaggerError)
    assert issubclass(StaggerError, Exception)
    assert issubclass(LockTimeoutError, TimeoutError)
    assert issubclass(EncodeError, TypeError)
    assert issubclass(AckOutOfRangeError, ValueError)


def test_s5_public_names():
    spec = {"StaggerQueue", "Consumer", "GroupInfo", "DeadLetter", "StaggerError", "QueueClosedError",
            "LockTimeoutError", "EncodeError", "DecodeError", "AckOutOfRangeError", "NotAQueueError",
            "StorageFullError"}
    assert set(stagger_sqlite.__all__) == spec | {"WorkerPool"}  # §7: the pool's name is ours
    for name in stagger_sqlite.__all__:
        assert getattr(stagger_sqlite, name) is not None


def test_s5_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        StaggerQueue(tmp_path / "no" / "such" / "q.db")


def test_s5_messages_name_the_path(qpath):
    q = StaggerQueue(qpath)
    q.close()
    with pytest.raises(QueueClosedError, match=re.escape(qpath)):
        q.write(1)


# -- §6 asyncio ----------------------------------------------------------------


def test_s6_aconsume_takes_the_same_arguments_as_consume():
    assert params(StaggerQueue.aconsume) == params(StaggerQueue.consume)


def test_s6_awrite_and_aconsume_do_not_block_the_loop(qpath):
    async def main():
        with StaggerQueue(qpath) as q:
            assert await q.awrite("a") == 1
            assert await q.awrite_many(["b", "c"]) == [2, 3]
            got, ticks = [], []

            async def consume():
                async for seq, msg in q.aconsume(0, batch=2, wait=30.0):
                    got.append((seq, msg))
                    if seq == 4:
                        break

            async def tick():
                while len(got) < 4:
                    ticks.append(1)
                    await asyncio.sleep(0.01)
                    if len(ticks) == 20:
                        await q.awrite("d")

            await asyncio.wait_for(asyncio.gather(consume(), tick()), 60)
            assert got == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
            assert len(ticks) >= 20  # the loop kept running while the consumer waited

            async with q.aconsume(group="g", wait=False) as c:
                assert [s async for s, _ in c] == [1, 2, 3, 4]

    asyncio.run(main())


# -- §7 Workers ------------------------------------------------------------------


def test_s7_work_command_runs_a_handler_over_a_group(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "bad", "b", "c"])
    r = cli("work", qpath, "--group", "w", "--handler", "tests.test_spec:spec_handler", "--processes", "2",
            "--batch", "2", "--max-attempts", "2", "--rate", "1000/s", "--until-idle", "0.5", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with StaggerQueue(qpath) as q:
        info = q.groups()["w"]
        assert (info.acked, info.dead, info.in_flight, info.retrying) == (4, 1, 0, 0)
        (d,) = q.dead_letters("w")
        assert (d.seq, d.msg, d.attempts) == (2, "bad", 2) and "bad message" in d.error


def test_s7_sigterm_stops_the_pool_with_status_0(qpath):
    with StaggerQueue(qpath) as q:
        q.write_many(range(1000))
        p = subprocess.Popen(CLI + ["work", qpath, "--group", "w", "--handler", "tests.test_spec:slow_handler",
                                    "--processes", "2"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: "w" in q.groups() and q.groups()["w"].acked > 0, 60, message="work under way")
        finally:
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 0
        assert "Traceback" not in p.stderr.read()
        info = q.groups()["w"]
        assert info.in_flight == 0 and info.acked < 1000  # in hand finished, the rest released


def test_s7_the_pool_is_available_from_python():
    assert WorkerPool.__doc__ and callable(getattr(WorkerPool, "run"))


# -- §8 HTTP in and out ----------------------------------------------------------


def test_s8_serve_writes_post_bodies_and_replies_with_the_seqno(qpath):
    p = subprocess.Popen(CLI + ["serve", qpath, "--bind", "127.0.0.1:0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://([\d.]+):(\d+)/", p.stderr.readline())
        assert m
        conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=30)
        conn.request("POST", "/", body=json.dumps({"order": 17}), headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200 and "1" in reply.read().decode()
        conn.request("POST", "/", body=b"\x00raw")
        reply = conn.getresponse()
        assert reply.status == 200 and "2" in reply.read().decode()
        conn.close()
        with StaggerQueue(qpath) as q:  # answered after the write
            assert list(q.consume(wait=False)) == [(1, {"order": 17}), (2, b"\x00raw")]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.got.append((int(self.headers["Stagger-Seq"]), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_s8_forward_posts_to_every_url_with_the_seqno(qpath):
    servers = []
    for _ in range(2):
        s = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        s.got = []
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    with StaggerQueue(qpath, codec="raw") as q:
        q.write_many([b"one", b"two"])
    urls = []
    for s in servers:
        urls += ["--url", f"http://127.0.0.1:{s.server_address[1]}/hook"]
    p = subprocess.Popen(CLI + ["forward", qpath, "--codec", "raw"] + urls, stderr=subprocess.PIPE, text=True)
    try:
        for s in servers:
            wait_for(lambda: len(s.got) >= 2, 60, message="both messages forwarded")
            assert sorted(s.got) == [(1, b"one"), (2, b"two")]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        for s in servers:
            s.shutdown()


# -- §9 Command line -------------------------------------------------------------


@pytest.mark.parametrize("command,flags", [
    ("info", ["--json"]),
    ("write", []),
    ("read", ["--ack", "--group", "--follow"]),
    ("purge", []),
    ("dead", []),
    ("requeue", []),
    ("check", []),
    ("work", ["--group", "--handler", "--processes", "--batch", "--max-attempts", "--rate", "--until-idle"]),
    ("serve", ["--bind"]),
    ("forward", ["--url"]),
    ("demo", []),
    ("bench", []),
])
def test_s9_every_command_exists_with_its_flags(command, flags):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    for flag in flags:
        assert flag in r.stdout, (command, flag)


def test_s9_write_read_info(qpath):
    r = cli("write", qpath, '{"order": 17}', '"text"')
    assert r.returncode == 0, r.stderr
    r = cli("write", qpath, input='[1, 2]\n{"n": null}\n')
    assert r.returncode == 0, r.stderr
    r = cli("read", qpath)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines == [{"seq": 1, "msg": {"order": 17}}, {"seq": 2, "msg": "text"},
                     {"seq": 3, "msg": [1, 2]}, {"seq": 4, "msg": {"n": None}}]
    r = cli("read", qpath, "--ack", "2")
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == [3, 4]
    r = cli("read", qpath, "--group", "g")
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == [1, 2, 3, 4]
    r = cli("purge", qpath, "--upto", "1")  # every group has finished 1..4
    assert r.returncode == 0 and r.stdout.strip() == "1"
    r = cli("purge", qpath, "2")  # the bound as an argument works too
    assert r.returncode == 0 and r.stdout.strip() == "1"
    r = cli("info", qpath, "--json")
    assert r.returncode == 0
    (line,) = r.stdout.splitlines()
    stats = json.loads(line)
    assert stats["last_seq"] == 4 and stats["stored"] == 2 and stats["bytes"] > 0
    assert stats["groups"]["g"]["acked"] == 4


def test_s9_read_follow_waits_for_new_messages(qpath):
    with StaggerQueue(qpath) as q:
        q.write("first")
        p = subprocess.Popen(CLI + ["read", qpath, "--follow"], stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(p.stdout.readline()) == {"seq": 1, "msg": "first"}
            q.write("second")
            assert json.loads(p.stdout.readline()) == {"seq": 2, "msg": "second"}
        finally:
            p.terminate()
            p.wait(60)


def test_s9_errors_are_one_line_without_traceback(tmp_path, qpath):
    cli("write", qpath, "1").check_returncode()
    for args in (("info", tmp_path / "missing.db"), ("read", qpath, "--ack", "5"), ("write", qpath, "{bad"),
                 ("info", tmp_path), ("read", qpath, "--ack", "-1"), ("serve", qpath, "--bind", "nonsense"),
                 ("work", qpath, "--group", "w", "--handler", "no_such_module:f"), ("dead", qpath)):
        assert_one_line_error(cli(*args))
