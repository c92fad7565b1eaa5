"""Consumer groups (SPEC §4) within one process: members are separate
consumers (and threads) on a real queue file. Behaviour across real processes
(SIGKILL, os._exit, four competing members) is in test_groups_procs.py."""

import dataclasses
import threading
import time

import pytest

import stagger_sqlite
from stagger_sqlite import AckOutOfRangeError, DeadLetter, GroupInfo, StaggerQueue

from .helpers import wait_for


@pytest.fixture
def q(qpath):
    with StaggerQueue(qpath, durability="normal") as queue:
        yield queue


def take(q, group, n, **kw):
    """Exactly n seqs from one member, waiting for them (and no longer)."""
    kw.setdefault("wait", 30)
    with q.consume(group=group, **kw) as c:
        return [next(c)[0] for _ in range(n)]


def drain(q, group, **kw):
    kw.setdefault("wait", False)
    with q.consume(group=group, **kw) as c:
        return [seq for seq, _ in c]


def test_exports():
    assert "GroupInfo" in stagger_sqlite.__all__ and "DeadLetter" in stagger_sqlite.__all__
    info = GroupInfo(acked=1, in_flight=0, retrying=0, lag=0, dead=0, delivered=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.acked = 2


def test_group_sees_every_message_in_order_and_acks_on_next_and_close(q):
    q.write_many([{"n": i} for i in range(1, 121)])
    with q.consume(group="g", batch=50, wait=False) as c:
        got = [(seq, msg["n"]) for seq, msg in c]
    assert got == [(i, i) for i in range(1, 121)]
    info = q.groups()["g"]
    assert (info.acked, info.in_flight, info.retrying, info.lag, info.dead) == (120, 0, 0, 0, 0)
    assert drain(q, "g") == []  # finished stays finished


def test_close_finishes_message_in_hand_and_releases_the_rest(q):
    q.write_many(range(10))
    c = q.consume(group="g", batch=5, wait=False)
    assert next(c)[0] == 1
    assert next(c)[0] == 2
    c.close()
    c.close()  # idempotent
    assert q.groups()["g"].acked == 2
    # 3..5 were claimed but unstarted: released at once (no lease wait), no attempt counted
    assert drain(q, "g", lease=30) == list(range(3, 11))
    assert q.groups()["g"].retrying == 0


def test_two_groups_each_get_everything(q):
    q.write_many(range(300))
    a = q.consume(group="a", batch=7, wait=False)
    b = q.consume(group="b", batch=50, wait=False)
    got_a, got_b = [], []
    for (sa, _), (sb, _) in zip(a, b):  # interleaved, so they run side by side
        got_a.append(sa)
        got_b.append(sb)
    got_a += [s for s, _ in a]
    got_b += [s for s, _ in b]
    a.close()
    b.close()
    assert got_a == got_b == list(range(1, 301))
    assert {n: i.acked for n, i in q.groups().items()} == {"a": 300, "b": 300}


def test_new_group_start_point_and_ack_ignored_for_existing_group(q):
    q.write_many(range(10))
    assert drain(q, "late", ack=7) == [8, 9, 10]
    q.write_many(range(5))
    assert drain(q, "late", ack=0) == [11, 12, 13, 14, 15]  # existing group: ack ignored
    assert drain(q, "fresh", ack=15) == []
    assert q.groups()["fresh"].acked == 15
    with pytest.raises(AckOutOfRangeError):
        q.consume(group="beyond", ack=16)
    assert "beyond" not in q.groups()
    with pytest.raises(AckOutOfRangeError):
        q.consume(group="late", ack=1000)  # existing group: ack ignored, but still range-checked (SPEC §3)
    q.consume(group="late", ack=3).close()


def test_bad_arguments(q):
    for kw in (
        {"group": ""},
        {"group": 5},
        {"group": "g", "lease": 0},
        {"group": "g", "lease": -1},
        {"group": "g", "max_attempts": 0},
        {"group": "g", "batch": 0},
        {"group": "g", "ack": -1},
        {"group": "g", "wait": "soon"},
    ):
        with pytest.raises(ValueError):
            q.consume(**kw)


def test_stale_ack_after_lease_expiry_is_fenced(q):
    q.write_many(["a", "b", "c"])
    old = q.consume(group="g", batch=3, lease=0.5, wait=False)
    assert next(old)[0] == 1
    # The old member stalls; another member gets its messages once the lease expires.
    new = q.consume(group="g", batch=3, lease=30, wait=30)
    seq, msg = next(new)
    assert (seq, msg) == (1, "a")
    assert old.ack(1) is False  # late ack from the former holder: no effect
    assert old.nack(1, error="late") is False
    assert q.groups()["g"].in_flight >= 1  # the new holder's delivery is intact
    assert new.ack(1) is True
    assert new.ack(1) is False  # already finished
    old.close()  # never raises because its lease was lost
    rest = [next(new)[0], next(new)[0]]  # 2 and 3 are redelivered too (old lost them)
    new.close()
    assert sorted(rest) == [2, 3]
    assert q.groups()["g"].acked == 3


def test_lease_is_renewed_while_a_member_keeps_handing_out(q):
    q.write_many(range(30))
    other_got = []
    stop = threading.Event()

    def other():
        with q.consume(group="g", batch=30, lease=30, wait=0.2) as c:
            while not stop.is_set():
                other_got.extend(s for s, _ in c)

    with q.consume(group="g", batch=30, lease=1.5, wait=False) as c:
        got = [next(c)[0]]  # this member now holds all 30
        t = threading.Thread(target=other)
        t.start()
        for seq, _ in c:  # 30 x 0.1 s = 3 s, twice the lease: renewed on the way
            time.sleep(0.1)
            got.append(seq)
    stop.set()
    t.join()
    assert got == list(range(1, 31))
    assert other_got == []


def test_nack_retry_dead_letter_requeue(q):
    q.write({"job": 1})
    times, errors = [], []
    with q.consume(group="g", max_attempts=3, wait=30) as c:
        for seq, msg in c:
            times.append(time.monotonic())
            assert c.nack(seq, delay=0.3, error=f"failure {len(times)}") is True
            if len(times) == 3:
                break
    assert all(b - a >= 0.3 for a, b in zip(times, times[1:]))
    info = q.groups()["g"]
    assert (info.acked, info.dead, info.retrying, info.in_flight) == (1, 1, 0, 0)
    [dead] = q.dead_letters("g")
    assert isinstance(dead, DeadLetter)
    assert (dead.seq, dead.msg, dead.attempts, dead.error) == (1, {"job": 1}, 3, "failure 3")
    assert q.requeue("g") == 1
    assert q.dead_letters("g") == []
    assert q.groups()["g"].acked == 0
    assert drain(q, "g") == [1]
    assert q.groups()["g"].acked == 1


def test_nack_without_delay_backs_off(q):
    q.write("x")
    with q.consume(group="g", wait=False) as c:
        seq, _ = next(c)
        before = time.time()
        assert c.nack(seq) is True
    assert q.groups()["g"].retrying == 1
    with q.consume(group="g", wait=30) as c:  # backoff of 0.5-1 s after the first failure
        seq, _ = next(c)
        assert seq == 1 and time.time() - before >= 0.5 * stagger_sqlite.groups.BACKOFF_BASE
    assert stagger_sqlite.groups.backoff(100) <= stagger_sqlite.groups.BACKOFF_CAP


def test_dead_letter_survives_purge_and_requeue_restores_it(q):
    q.write_many(["poison", "fine"])
    with q.consume(group="g", max_attempts=1, wait=False) as c:
        for seq, msg in c:
            if msg == "poison":
                c.nack(seq, error="bad")
    assert q.groups()["g"].acked == 2  # a dead letter counts as finished
    assert q.purge() == 2
    assert [(d.seq, d.msg) for d in q.dead_letters("g")] == [(1, "poison")]
    assert q.requeue("g", [1]) == 1
    with q.consume(group="g", wait=False) as c:
        assert [(s, m) for s, m in c] == [(1, "poison")]
    assert q.groups()["g"].acked == 2


def test_exception_in_body_nacks_in_hand_and_releases_rest_at_once(q):
    q.write_many(range(10))
    with pytest.raises(RuntimeError):
        with q.consume(group="g", batch=10, lease=30, max_attempts=2, wait=False) as c:
            for seq, _ in c:
                if seq == 3:
                    raise RuntimeError("boom on 3")
    info = q.groups()["g"]
    assert (info.acked, info.in_flight, info.retrying, info.dead) == (2, 0, 1, 0)
    assert drain(q, "g", lease=30) == list(range(4, 11))  # released: no lease wait, no attempt
    with q.consume(group="g", max_attempts=2, wait=30) as c:
        seq, _ = next(c)  # 3, after its backoff
        c.nack(seq, error="boom again")
    [dead] = q.dead_letters("g")
    assert (dead.seq, dead.attempts, dead.error) == (3, 2, "boom again")
    info = q.groups()["g"]
    assert (info.acked, info.in_flight, info.retrying, info.dead) == (10, 0, 0, 1)  # dead counts as finished


def test_exception_in_body_retries_with_backoff(q):
    q.write_many(range(3))
    with pytest.raises(KeyError):
        with q.consume(group="g", batch=10, wait=False) as c:
            for seq, _ in c:
                raise KeyError("missing")
    assert q.groups()["g"].retrying == 1
    got = take(q, "g", 3)  # 2 and 3 at once, 1 when its retry falls due
    assert sorted(got) == [1, 2, 3]
    assert q.groups()["g"].acked == 3


def test_close_in_finally_of_a_failing_loop_nacks_the_message_in_hand(q):
    # try/finally instead of `with`: close() sees the exception passing
    # through and nacks the message in hand as `with` would (never acks it).
    q.write_many(range(5))
    c = q.consume(group="g", batch=5, lease=30, wait=False)
    with pytest.raises(ValueError):
        try:
            for seq, _ in c:
                if seq == 2:
                    raise ValueError("boom on 2")
        finally:
            c.close()
    info = q.groups()["g"]
    assert (info.acked, info.retrying, info.in_flight) == (1, 1, 0)  # 1 was finished, 2 waits for a retry
    assert drain(q, "g", lease=30) == [3, 4, 5]  # released at once
    c = q.consume(group="g", max_attempts=1, wait=30)
    try:
        raise ValueError("boom on 2 again")
    except ValueError:
        assert next(c)[0] == 2  # after its backoff
        c.close()
    [dead] = q.dead_letters("g")
    assert (dead.seq, dead.attempts, dead.error) == (2, 2, "boom on 2 again")


def test_close_in_an_except_block_nacks_and_interrupt_releases(q):
    q.write_many(range(3))
    c = q.consume(group="g", batch=3, lease=30, wait=False)
    seq, _ = next(c)
    try:
        raise OSError("disk gone")
    except OSError:
        c.close()
    info = q.groups()["g"]
    assert (seq, info.retrying, info.in_flight) == (1, 1, 0)
    c = q.consume(group="h", batch=3, lease=30, wait=False)
    next(c)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        c.close()  # not the message's fault: released, no attempt counted
    assert drain(q, "h") == [1, 2, 3]
    assert q.groups()["h"].dead == 0


def test_a_with_block_ending_normally_inside_an_outer_except_finishes(q):
    q.write_many(range(3))
    try:
        raise LookupError("unrelated, already handled")
    except LookupError:
        with q.consume(group="g", batch=3, wait=False) as c:
            assert next(c)[0] == 1
    info = q.groups()["g"]
    assert (info.acked, info.retrying) == (1, 0)


def test_nack_error_may_be_an_exception(q):
    q.write_many(range(2))
    with q.consume(group="g", batch=1, max_attempts=1, wait=False) as c:
        seq, _ = next(c)
        assert c.nack(seq, error=ValueError("bad input")) is True
        seq, _ = next(c)
        assert c.nack(seq, error=b"raw bytes") is True
    assert [(d.seq, d.error) for d in q.dead_letters("g")] == [(1, "bad input"), (2, "raw bytes")]


def test_bare_for_loop_left_by_exception_releases_rest_and_leases_the_one_in_hand(q):
    q.write_many(range(5))
    with pytest.raises(ValueError):
        for seq, _ in q.consume(group="g", batch=5, lease=3.0, wait=False):
            raise ValueError("no with block")
    # Without `with`, the consumer cannot tell an exception from a break:
    # the unstarted rest is released at once, the one in hand waits out its lease.
    assert drain(q, "g", lease=30) == [2, 3, 4, 5]
    assert take(q, "g", 1, lease=30) == [1]
    assert q.groups()["g"].acked == 5


def test_iterating_in_pieces_finishes_everything(q):
    q.write_many(range(20))
    c = q.consume(group="g", batch=3, wait=False)
    import itertools

    first = [s for s, _ in itertools.islice(c, 5)]
    rest = [s for s, _ in c]
    c.close()
    assert first + rest == list(range(1, 21))
    assert q.groups()["g"] == GroupInfo(acked=20, in_flight=0, retrying=0, lag=0, dead=0, delivered=20)


def test_waiting_member_picks_up_expired_lease_without_new_write(q):
    q.write("held")
    holder = q.consume(group="g", lease=0.5, wait=False)
    assert next(holder)[0] == 1
    last = q.last_seq
    got = []
    waiter = threading.Thread(target=lambda: got.extend(s for s, _ in [next(q.consume(group="g", wait=30))]))
    started = time.monotonic()
    waiter.start()
    waiter.join(60)
    assert got == [1]
    assert q.last_seq == last  # nobody wrote anything
    assert time.monotonic() - started < 30
    holder.close()


def test_wait_seconds_stops_when_idle(q):
    q.write(1)
    started = time.monotonic()
    assert drain(q, "g", wait=0.3) == [1]
    assert time.monotonic() - started >= 0.3


def test_purge_keeps_unfinished_messages(q):
    q.write_many(range(10))
    with q.consume(group="slow", batch=3, wait=False) as c:
        for seq, _ in c:
            if seq == 4:
                break  # 4 finished (normal close), 5 and 6 released
    drain(q, "fast")
    assert q.groups()["slow"].acked == 4
    assert q.purge() == 4
    assert len(q) == 6
    assert q.purge(8) == 0
    with q.consume(ack=9, purge=9, wait=False) as c:  # a plain consumer's purge= is bounded too
        assert [s for s, _ in c] == [10]
    assert len(q) == 6
    assert drain(q, "slow") == list(range(5, 11))
    assert q.purge() == 6


def test_purge_bound_with_out_of_order_finishes(q):
    q.write_many(range(6))
    a = q.consume(group="g", batch=2, wait=False)
    b = q.consume(group="g", batch=2, wait=False)
    assert next(a)[0] == 1  # a holds 1 (and 2)
    assert [s for s, _ in b] == [3, 4, 5, 6]
    b.close()
    info = q.groups()["g"]
    assert info.acked == 0 and info.in_flight == 2
    assert q.purge() == 0
    assert a.ack(1) is True
    assert q.groups()["g"].acked == 1
    a.close()  # releases 2
    assert q.groups()["g"].acked == 1
    assert drain(q, "g") == [2]
    assert q.groups()["g"].acked == 6


def test_group_info_figures(q):
    q.write_many(range(10))
    assert q.groups() == {}
    with q.consume(group="g", batch=4, wait=False) as c:
        assert next(c)[0] == 1
        assert next(c)[0] == 2  # 1 finished locally
        c.nack(2, error="hopeless", dead=True)
        assert next(c)[0] == 3
        c2 = q.consume(group="g", batch=2, max_attempts=5, wait=False)
        assert next(c2)[0] == 5
        assert c2.nack(5, delay=60, error="retry") is True
        info = q.groups()["g"]
        # 1 finished, 2 dead (finished too); 3, 4 claimed by c; 6 claimed by c2; 5 waits for a retry
        assert info == GroupInfo(acked=2, in_flight=3, retrying=1, lag=8, dead=1, delivered=6)
        c2.close()
    info = q.groups()["g"]
    # 3 finished at close; 4 and 6 released (lag only), 5 still waits
    assert (info.acked, info.in_flight, info.retrying, info.dead, info.lag) == (3, 0, 1, 1, 7)
    stats = q.stats()
    assert stats["groups"] == {"g": dataclasses.asdict(info)}


def test_undecodable_message_is_dead_lettered(qpath):
    with StaggerQueue(qpath, codec="raw") as raw:
        raw.write(b"\xa1")  # truncated cbor map
    with StaggerQueue(qpath) as q:
        q.write_many(["ok", "fine"])
        q.write  # noqa: B018
        with q.consume(group="g", wait=False) as c:
            got = [(s, m) for s, m in c]
        assert got == [(2, "ok"), (3, "fine")]
        [dead] = q.dead_letters("g")
        assert dead.seq == 1 and dead.msg is None and dead.body == b"\xa1"
        assert "seq=1" in dead.error
        assert q.groups()["g"].acked == 3


def test_explicit_ack_and_nack_of_unknown_seq(q):
    q.write_many(range(3))
    with q.consume(group="g", batch=1, wait=False) as c:
        seq, _ = next(c)
        assert c.ack(seq) is True
        assert c.ack(seq) is False
        assert c.nack(99) is False
        assert c.ack(2) is False  # not handed to this member
        seq, _ = next(c)
        assert seq == 2
    assert q.groups()["g"].acked == 2


def test_queue_closed_while_waiting_ends_quietly(q):
    got = []

    def member():
        with q.consume(group="g", wait=True) as c:
            got.extend(c)

    t = threading.Thread(target=member)
    t.start()
    time.sleep(0.2)
    q.close()
    t.join(30)
    assert not t.is_alive() and got == []


def test_members_in_threads_share_work_exactly_once(q):
    q.write_many(range(2000))
    results = [[] for _ in range(4)]

    def member(i):
        with q.consume(group="g", batch=10, wait=False) as c:
            results[i].extend(s for s, _ in c)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(s for r in results for s in r)
    assert everything == list(range(1, 2001))
    wait_for(lambda: q.groups()["g"].acked == 2000, 5)


def test_scheduled_messages_reach_a_group(q):
    q.schedule({"later": True}, delay=0.3)
    with q.consume(group="g", wait=30) as c:
        seq, msg = next(c)
    assert msg == {"later": True}
    assert q.groups()["g"].acked == seq


def test_group_under_asyncio(q):
    import asyncio

    async def main():
        got = []
        async with q.aconsume(group="g", lease=0.5, wait=0.5) as c:
            await q.awrite_many(["a", "b"])
            async for seq, msg in c:
                got.append(msg)
        return got

    assert asyncio.run(main()) == ["a", "b"]
    assert q.groups()["g"].acked == 2


def test_readme_group_examples_run(tmp_path):
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.rst")) as f:
        text = f.read()
    section = text.split("Consumer groups: worker processes\n", 1)[1]
    section = re.split(r"\n[^\n]+\n=+\n", section, maxsplit=1)[0]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)
    assert len(blocks) >= 6
    for i, block in enumerate(blocks):
        script = tmp_path / f"example{i}.py"
        script.write_text("\n".join(line[4:] for line in block.splitlines()) + "\n")
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        if "workers-demo" in block:
            assert "acked=1000" in out.stdout and "dead=0" in out.stdout
        if "dead-demo" in block:
            assert out.stdout.splitlines() == ["2 poison 1 cannot parse", "1", "[2]"]
        if "lists-demo" in block:
            assert out.stdout.splitlines() == ["[1, 2, 3]", "[4, 5, 6]", "[7]", "7"]
        if "pause-demo" in block:
            assert out.stdout.splitlines() == ["[]", "True", "[1, 2]"]
        if "drop-demo" in block:
            assert out.stdout.splitlines() == ["0", "True", "5"]


def test_keyboard_interrupt_releases_everything_without_an_attempt(q):
    q.write_many(range(3))
    with pytest.raises(KeyboardInterrupt):
        with q.consume(group="g", batch=3, lease=30, wait=False) as c:
            for seq, _ in c:
                if seq == 2:
                    raise KeyboardInterrupt
    info = q.groups()["g"]
    assert (info.acked, info.in_flight, info.retrying, info.dead) == (1, 0, 0, 0)
    assert drain(q, "g", lease=30) == [2, 3]  # at once: no lease wait, no backoff


def test_member_that_lost_its_lease_hands_out_nothing_stale(q):
    q.write_many(["a", "b", "c"])
    old = q.consume(group="g", batch=3, lease=0.5, wait=False)
    assert next(old)[0] == 1  # old holds 1, 2, 3
    new = q.consume(group="g", batch=3, lease=30, wait=30)
    assert next(new)[0] == 1  # after old's lease expired: 1, 2, 3 went back
    # old goes on: its implicit ack of 1 must not touch new's delivery, and
    # 2 and 3 are no longer its own: it gets them only by claiming them anew.
    rest = [s for s, _ in old]
    assert sorted(rest) == [2, 3]
    assert q.groups()["g"].in_flight == 1  # 1, still with new
    assert new.ack(1) is True
    new.close()
    assert q.groups()["g"] == GroupInfo(acked=3, in_flight=0, retrying=0, lag=0, dead=0, delivered=3)


# -- a list handed out together (next_batch) -------------------------------


def test_next_batch_hands_out_lists_and_finishes_each_with_the_next(q):
    q.write_many(range(1, 26))
    with q.consume(group="g", batch=10, wait=False) as c:
        first = c.next_batch()
        assert first == [(s, s) for s in range(1, 11)]
        info = q.groups()["g"]
        assert (info.acked, info.in_flight) == (0, 10)  # all ten in hand at once
        assert [s for s, _ in c.next_batch(4)] == [11, 12, 13, 14]
        info = q.groups()["g"]
        assert (info.acked, info.in_flight) == (10, 4)  # the claim finished the first list
        assert [s for s, _ in c.next_batch()] == list(range(15, 25))
        assert [s for s, _ in c.next_batch()] == [25]  # what is claimable now, not a full list
        assert c.next_batch() == []  # wait=False: nothing claimable
        with pytest.raises(ValueError):
            c.next_batch(0)
    assert q.groups()["g"] == GroupInfo(acked=25, in_flight=0, retrying=0, lag=0, dead=0, delivered=25)


def test_next_batch_ack_and_nack_one_or_nack_all(q):
    q.write_many(range(1, 7))
    with q.consume(group="g", batch=3, max_attempts=1, wait=False) as c:
        assert [s for s, _ in c.next_batch()] == [1, 2, 3]
        assert c.ack(1) is True
        assert c.nack(2, error="two") is True  # max_attempts=1: a dead letter now
        assert c.nack(2) is False  # no longer in hand
        assert [s for s, _ in c.next_batch()] == [4, 5, 6]  # 3 finished by this call
        assert c.nack_all(error="all") == 3
        assert c.nack_all() == 0  # nothing left in hand
        assert c.next_batch() == []
    assert [(d.seq, d.error) for d in q.dead_letters("g")] == [(2, "two"), (4, "all"), (5, "all"), (6, "all")]
    assert q.groups()["g"].acked == 6


def test_exception_with_a_list_in_hand_nacks_the_whole_list(q):
    q.write_many(range(1, 11))
    with pytest.raises(RuntimeError):
        with q.consume(group="g", batch=4, max_attempts=1, wait=False) as c:
            c.next_batch()
            raise RuntimeError("handler broke")
    assert [(d.seq, d.error) for d in q.dead_letters("g")] == [(s, "handler broke") for s in (1, 2, 3, 4)]
    assert drain(q, "g") == list(range(5, 11))


def test_next_batch_costs_one_write_per_list(q):
    q.write_many(range(100))
    writes = []
    real = q._storage.write

    def counting(fn, **kw):  # counts the calls, runs the real write
        writes.append(fn)
        return real(fn, **kw)

    q._storage.write = counting
    try:
        lists = 0
        with q.consume(group="g", batch=10, wait=False) as c:
            while c.next_batch():
                lists += 1
    finally:
        del q._storage.write
    assert lists == 10
    # The group's creation, one claim per list (each finishing the previous
    # list), and the last, empty claim, which finishes the last list.
    assert len(writes) == 1 + lists + 1
    assert q.groups()["g"].acked == 100


def test_a_list_whose_member_died_comes_back_alone_one_attempt_each(q):
    q.write_many(range(1, 5))
    gone = q.consume(group="g", batch=4, lease=0.5, wait=False)
    assert len(gone.next_batch()) == 4  # then it "dies": never finishes them
    with q.consume(group="g", batch=4, lease=30, max_attempts=2, wait=30) as c:
        lists = [[s for s, _ in c.next_batch()] for _ in range(4)]
    assert lists == [[1], [2], [3], [4]]  # alone: each claim is that message's start mark
    gone.close()  # late: changes nothing, never raises
    assert gone.ack(1) is False
    assert q.groups()["g"] == GroupInfo(acked=4, in_flight=0, retrying=0, lag=0, dead=0, delivered=4)


# -- pause ------------------------------------------------------------------


def test_pause_holds_every_member_and_resume_wakes_a_waiting_one(q):
    q.write_many([1, 2, 3])
    q.pause("g")  # before the group exists: its first members start paused
    assert drain(q, "g") == []  # wait=False: nothing claimable, it stops
    assert q.groups()["g"].paused
    got = []

    def member():
        with q.consume(group="g", wait=60) as c:
            for seq, _ in c:
                got.append(seq)
                if seq == 4:
                    break

    t = threading.Thread(target=member)
    t.start()
    q.write(4)  # a new message wakes the member; the claim still hands out nothing
    time.sleep(0.5)  # asserting an absence: give it time to misbehave
    assert got == [] and t.is_alive()
    q.pause("g")  # idempotent
    q.resume("g")
    t.join(60)
    assert got == [1, 2, 3, 4]
    assert not q.groups()["g"].paused
    q.resume("g")  # idempotent
    with pytest.raises(ValueError):
        q.pause("")


def test_pause_reaches_a_member_working_through_a_claimed_batch(q):
    q.write_many(range(1, 101))
    with q.consume(group="g", batch=100, lease=1.0, wait=False) as c:
        assert next(c)[0] == 1  # this member holds all 100
        q.pause("g")
        got = []
        for seq, _ in c:  # 99 x 20 ms: well past the renewal, a tenth of the lease
            got.append(seq)
            time.sleep(0.02)
        info = q.groups()["g"]
    assert got == list(range(2, 2 + len(got))) and len(got) < 99
    # What it handed out was finished; the unstarted rest was released at once.
    assert (info.acked, info.in_flight, info.retrying) == (1 + len(got), 0, 0)
    q.resume("g")
    assert drain(q, "g") == list(range(2 + len(got), 101))


# -- drop_group -------------------------------------------------------------


def test_drop_group_lets_purge_proceed(q):
    q.write_many(range(1, 6))
    q.consume(group="abandoned").close()
    with q.consume(group="g", max_attempts=1, wait=False) as c:
        for seq, _ in c:
            if seq == 2:
                c.nack(seq, error="bad")
    q.pause("abandoned")
    assert q.purge() == 0  # "abandoned" finished nothing
    assert q.drop_group("abandoned") is True
    assert q.drop_group("abandoned") is False
    assert list(q.groups()) == ["g"]
    assert q.purge() == 5
    assert [(d.seq, d.msg) for d in q.dead_letters("g")] == [(2, 2)]  # other groups untouched
    assert q.drop_group("g") is True
    assert q.dead_letters("g") == [] and q.groups() == {} and q.stats()["groups"] == {}
    q.write(6)
    assert drain(q, "abandoned") == [6]  # a new group of that name: not paused, from what is stored
    with pytest.raises(ValueError):
        q.drop_group("")


def test_live_member_of_a_dropped_group_ends_and_recreates_nothing(q):
    q.write_many(range(1, 11))
    c = q.consume(group="g", batch=5, lease=1.0, wait=30)
    assert next(c)[0] == 1  # holds 1..5
    assert q.drop_group("g") is True
    assert c.ack(1) is False
    assert c.nack(2) is False
    rest = [s for s, _ in c]  # at most what it had in memory, until its next claim or renewal
    assert set(rest) <= {3, 4, 5}
    assert c.dropped
    assert c.next_batch() == []
    c.close()
    assert q.groups() == {}


def test_waiting_member_of_a_dropped_group_wakes_and_ends(q):
    q.consume(group="g").close()
    ready = threading.Event()
    members = []

    def member():
        with q.consume(group="g", wait=60) as c:
            members.append(c)
            ready.set()
            assert list(c) == []

    t = threading.Thread(target=member)
    t.start()
    assert ready.wait(60)
    assert q.drop_group("g") is True
    t.join(60)
    assert not t.is_alive() and members[0].dropped
    assert q.groups() == {}


def test_group_created_again_after_a_drop_is_fenced_from_old_members(q):
    q.write_many(range(1, 4))
    old = q.consume(group="g", batch=3, wait=False)
    assert next(old)[0] == 1  # holds 1, 2, 3
    assert q.drop_group("g") is True
    new = q.consume(group="g", batch=3, wait=False)  # a new group: sees every stored message
    assert next(new)[0] == 1  # holds 1, 2, 3
    # The old member's claim tokens never match the new group's rows.
    assert old.ack(1) is False
    assert old.nack(2) is False
    old.close()  # releasing its 3 touches nothing of the new group's
    assert q.groups()["g"].in_flight == 3
    assert [s for s, _ in new] == [2, 3]
    new.close()
    assert q.groups()["g"].acked == 3


def test_a_member_keeping_up_with_a_stream_claims_no_sooner_than_the_gap(qpath, monkeypatch):
    """A member whose last claim got part of a batch (it keeps up with the
    writers) claims again no sooner than CLAIM_GAP after it, so that under
    a steady stream it takes the writer lock for a handful of messages at a
    time, not for each. Every message still arrives once, in order."""
    from stagger_sqlite.groups import CLAIM_GAP, GroupConsumer

    claims = []  # (monotonic time of the claim, rows it got, want)
    real = GroupConsumer._claim

    def spy(self, want):
        before = len(self._rows)
        at = time.monotonic()
        try:
            return real(self, want)
        finally:
            claims.append((at, len(self._rows) - before, want))

    n = 400
    with StaggerQueue(qpath, durability="normal") as q:
        q.consume(group="g", wait=False).close()
        got = []

        def member():
            with q.consume(group="g", batch=50, wait=5.0) as c:
                for seq, _ in c:
                    got.append(seq)
                    if len(got) == n:
                        return

        monkeypatch.setattr(GroupConsumer, "_claim", spy)  # a spy: the real claim runs
        t = threading.Thread(target=member)
        t.start()
        for i in range(n):
            q.write(i)
        t.join(60)
    assert got == list(range(1, n + 1))
    after_partial = [(b[0] - a[0]) for a, b in zip(claims, claims[1:]) if 0 < a[1] < a[2]]
    assert after_partial, "the member kept up with the writer at least once"
    assert min(after_partial) >= CLAIM_GAP * 0.99


def test_figures_count_a_message_finished_when_the_next_was_asked_for(qpath):
    """A member finishes a message when it asks for the next (written at its
    next write, with the others it finished): this process's figures, from
    any handle, count it finished at once."""
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many(range(10))
        c = q.consume(group="g", batch=10, wait=False)
        assert next(c)[0] == 1
        assert next(c)[0] == 2  # 1 finished
        assert next(c)[0] == 3  # 2 finished
        with StaggerQueue(qpath) as other:
            for figures in (q.groups()["g"], other.groups()["g"], GroupInfo(**other.stats()["groups"]["g"])):
                assert (figures.acked, figures.in_flight, figures.lag) == (2, 8, 8)
        c.close()  # 3 finished, 4..10 released
        info = q.groups()["g"]
        assert (info.acked, info.in_flight) == (3, 0)


def test_close_in_a_generator_closed_after_a_break_finishes_the_message(q):
    # A generator wrapping a member closes it in its `finally`; leaving the
    # generator (break) raises GeneratorExit there: the normal end, not a failure.
    q.write_many(["a", "b"])

    def messages():
        c = q.consume(group="g", batch=2, wait=False)
        try:
            for seq, msg in c:
                yield seq, msg
        finally:
            c.close()

    gen = messages()
    for seq, _ in gen:
        break
    gen.close()
    info = q.groups()["g"]
    assert (seq, info.acked, info.in_flight) == (1, 1, 0)
    assert drain(q, "g") == [2]
