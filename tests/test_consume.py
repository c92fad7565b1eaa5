"""Consuming from an ack point (SPEC §3)."""

import os
import subprocess
import sys
import threading
import time

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagger_sqlite import AckOutOfRangeError, Consumer, DecodeError, QueueClosedError, StaggerQueue


@pytest.fixture
def q(qpath):
    with StaggerQueue(qpath) as q:
        yield q


@pytest.mark.parametrize("batch", [1, 7, 50, 1000])
@pytest.mark.parametrize("ack", [0, 1, 49, 50, 51, 99, 120])
def test_consume_yields_exactly_the_messages_after_ack_in_order(q, batch, ack):
    q.write_many(f"m{i}" for i in range(1, 121))
    got = list(q.consume(ack=ack, batch=batch, wait=False))
    assert got == [(s, f"m{s}") for s in range(ack + 1, 121)]


def test_consume_returns_a_consumer_tracking_its_position(q):
    q.write_many(range(5))
    c = q.consume(ack=2, wait=False)
    assert isinstance(c, Consumer)
    assert c.position == 2
    assert next(c) == (3, 2)
    assert c.position == 3
    assert list(c) == [(4, 3), (5, 4)]
    assert c.position == 5


def test_messages_written_while_consuming_are_seen(q):
    q.write_many(range(3))
    seen = []
    for seq, msg in q.consume(batch=2, wait=False):
        seen.append(seq)
        if seq == 2:
            q.write_many([10, 11, 12])
    assert seen == [1, 2, 3, 4, 5, 6]


def test_purged_messages_below_the_first_stored_are_skipped_silently(q):
    q.write_many(range(10))
    q.purge(6)
    assert [s for s, _ in q.consume(ack=2, wait=False)] == [7, 8, 9, 10]
    assert [s for s, _ in q.consume(ack=0, batch=1, wait=False)] == [7, 8, 9, 10]


def test_consume_of_an_emptied_queue_with_an_old_ack(q):
    q.write_many(range(10))
    q.purge()
    assert list(q.consume(ack=3, wait=False)) == []
    q.write("x")
    assert list(q.consume(ack=3, wait=False)) == [(11, "x")]


def test_purge_removes_up_to_min_of_purge_and_ack_before_the_first_message(q):
    q.write_many(range(10))
    c = q.consume(ack=4, purge=2, wait=False)
    assert len(q) == 8  # done before the first next()
    assert [s for s, _ in c] == list(range(5, 11))
    assert len(q) == 8


def test_purge_beyond_ack_behaves_as_purge_equal_ack(q):
    q.write_many(range(10))
    got = list(q.consume(ack=4, purge=9, wait=False))
    assert [s for s, _ in got] == list(range(5, 11))  # nothing after ack was lost
    assert len(q) == 6
    assert [s for s, _ in q.consume(wait=False)] == list(range(5, 11))


def test_purge_zero_and_ack_zero_removes_nothing(q):
    q.write_many(range(3))
    list(q.consume(ack=0, purge=100, wait=False))
    assert len(q) == 3


def test_ack_beyond_last_seq_is_ack_out_of_range(q):
    with pytest.raises(AckOutOfRangeError, match="ack=1"):
        q.consume(ack=1)
    q.write_many(range(3))
    q.purge()
    q.consume(ack=3, wait=False)  # fine: written, then purged
    with pytest.raises(AckOutOfRangeError) as e:
        q.consume(ack=4, wait=False)
    assert isinstance(e.value, ValueError)
    assert q.path in str(e.value)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"ack": -1}, "ack"),
        ({"ack": 1.0}, "ack"),
        ({"ack": "0"}, "ack"),
        ({"ack": True}, "ack"),
        ({"batch": 0}, "batch"),
        ({"batch": -5}, "batch"),
        ({"batch": 2.5}, "batch"),
        ({"purge": -1}, "purge"),
        ({"purge": "all"}, "purge"),
        ({"wait": -1}, "wait"),
        ({"wait": "yes"}, "wait"),
        ({"wait": None}, "wait"),
    ],
)
def test_bad_arguments_are_value_errors(q, kwargs, word):
    q.write(1)
    with pytest.raises(ValueError, match=word):
        q.consume(**kwargs)
    assert len(q) == 1


def test_decode_error_names_the_seqno_and_the_consumer_goes_on(qpath):
    with StaggerQueue(qpath, codec="raw") as raw:
        raw.write_many([b"\xa1\x01\x02", b"\xff\xfe", b"\xa1\x01\x02"])  # cbor: {1: 2}, garbage, {1: 2}
    with StaggerQueue(qpath) as q:
        c = q.consume(wait=False)
        assert next(c) == (1, {1: 2})
        with pytest.raises(DecodeError, match="seq=2") as e:
            next(c)
        assert e.value.seq == 2
        assert qpath in str(e.value)
        assert next(c) == (3, {1: 2})


def test_wait_false_stops_when_caught_up(q):
    assert list(q.consume(wait=False)) == []


def test_wait_seconds_stops_after_that_long_without_a_message(q):
    q.write(1)
    start = time.monotonic()
    got = list(q.consume(wait=0.3))
    elapsed = time.monotonic() - start
    assert got == [(1, 1)]
    assert elapsed >= 0.3


def test_wait_seconds_counts_idle_time_and_restarts_after_each_message(q):
    q.write(0)

    def trickle():
        for i in range(1, 4):
            time.sleep(0.3)
            q.write(i)

    t = threading.Thread(target=trickle)
    start = time.monotonic()
    t.start()
    got = [m for _, m in q.consume(wait=1.5)]
    elapsed = time.monotonic() - start
    t.join()
    # gaps shorter than `wait` never stop it; it ends 1.5 s after the last write
    assert got == [0, 1, 2, 3]
    assert elapsed >= 0.9 + 1.5


def test_wait_true_sees_a_write_from_another_process(q):
    got = []

    def consume():
        for seq, msg in q.consume():
            got.append(msg)
            if msg == "last":
                return

    t = threading.Thread(target=consume)
    t.start()
    code = f"from stagger_sqlite import StaggerQueue\nwith StaggerQueue({q.path!r}) as q: q.write('hello'); q.write('last')"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    t.join(60)
    assert not t.is_alive()
    assert got == ["hello", "last"]


def test_close_from_another_thread_ends_a_waiting_consumer_quietly(qpath):
    q = StaggerQueue(qpath)
    q.write(1)
    outcome = []
    started = threading.Event()

    def consume():
        try:
            for seq, msg in q.consume(wait=True):
                started.set()
            outcome.append("ended")
        except Exception as e:  # the test fails on any exception
            outcome.append(e)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    time.sleep(0.1)  # let it reach its wait (either way it must end quietly)
    q.close()
    t.join(30)
    assert not t.is_alive()
    assert outcome == ["ended"]


def test_close_racing_a_busy_consumer_never_raises(qpath):
    """Closing while the consumer reads pages (not only while it waits)."""
    for _ in range(20):
        q = StaggerQueue(qpath)
        if q.last_seq == 0:
            q.write_many(range(200))
        outcome = []

        def consume():
            try:
                for _ in q.consume(batch=1, wait=True):
                    pass
                outcome.append("ended")
            except Exception as e:
                outcome.append(e)

        t = threading.Thread(target=consume)
        t.start()
        q.close()
        t.join(30)
        assert outcome == ["ended"]


def test_consumer_close_and_context_manager(q):
    q.write_many(range(5))
    with q.consume(wait=True) as c:
        assert next(c) == (1, 0)
    assert list(c) == []  # closed: ends, even with wait=True
    c2 = q.consume(wait=True)
    c2.close()
    c2.close()
    assert list(c2) == []


def test_consume_on_closed_queue_raises(qpath):
    q = StaggerQueue(qpath)
    q.close()
    with pytest.raises(QueueClosedError):
        q.consume()


def test_many_consumers_each_see_every_message(q):
    q.write_many(range(100))
    code = (
        "import sys\nfrom stagger_sqlite import StaggerQueue\n"
        f"with StaggerQueue({q.path!r}) as q:\n"
        "    print(sum(1 for _ in q.consume(ack=0, batch=13, wait=False)))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    counts = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert counts == [100, 100, 100]
    assert sum(1 for _ in q.consume(wait=False)) == 100


def test_a_consumer_holding_a_message_does_not_stop_a_checkpoint(qpath):
    """No read transaction stays open across a yield: while a consumer holds a
    message for seconds, another connection's TRUNCATE checkpoint completes
    (busy=0) and the WAL shrinks to nothing."""
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([b"x" * 1000] * 100)  # batch boundary inside: rows 1-50 read
        c = q.consume(batch=50, wait=False)
        assert next(c)[0] == 1
        # Writes after the consumer's read make the WAL grow past its read snapshot.
        for i in range(20):
            q.write_many([b"y" * 4000] * 10)
        assert os.path.getsize(qpath + "-wal") > 0
        held_since = time.monotonic()
        time.sleep(2.0)  # the caller works on its message
        other = apsw.Connection(qpath)
        try:
            other.set_busy_timeout(5000)
            busy, log, done = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
        finally:
            other.close()
        assert busy == 0
        assert log == done
        assert os.path.getsize(qpath + "-wal") == 0
        assert time.monotonic() - held_since < 30
        # the consumer goes on where it was, across the batch boundary
        rest = [s for s, _ in c]
        assert rest == list(range(2, 301))


# -- a model check: random writes, purges and consumes against a plain list --

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 12)),
        st.tuples(st.just("purge"), st.integers(0, 60)),
        st.tuples(st.just("consume"), st.integers(0, 60), st.integers(1, 20), st.one_of(st.none(), st.integers(0, 60))),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_consume_matches_a_model(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("model") / "q.db")
    stored = {}  # seq -> msg
    last = 0
    with StaggerQueue(path, durability="normal") as q:
        for op in ops:
            if op[0] == "write":
                msgs = [f"m{last + i + 1}" for i in range(op[1])]
                seqs = q.write_many(msgs)
                assert seqs == list(range(last + 1, last + 1 + op[1]))
                stored.update(zip(seqs, msgs))
                last += op[1]
            elif op[0] == "purge":
                removed = q.purge(op[1])
                gone = [s for s in stored if s <= op[1]]
                assert removed == len(gone)
                for s in gone:
                    del stored[s]
            else:
                _, ack, batch, purge = op
                if ack > last:
                    with pytest.raises(AckOutOfRangeError):
                        q.consume(ack=ack, batch=batch, purge=purge, wait=False)
                    continue
                got = list(q.consume(ack=ack, batch=batch, purge=purge, wait=False))
                if purge is not None:
                    for s in [s for s in stored if s <= min(purge, ack)]:
                        del stored[s]
                assert got == sorted((s, m) for s, m in stored.items() if s > ack)
            assert q.last_seq == last
            assert len(q) == len(stored)
