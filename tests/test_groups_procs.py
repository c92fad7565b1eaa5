"""Consumer groups across real processes: competing members, SIGKILL mid-batch,
a message that kills its worker every time (SPEC §4)."""

import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time

import pytest

from stagger_sqlite import StaggerQueue

from .helpers import wait_for

CTX = mp.get_context("fork")


def member(path, group, out, start, batch, lease, wait):
    """Consume until idle for ``wait`` s; report the seqs handled."""
    q = StaggerQueue(path, durability="normal")
    start.wait(60)
    got = []
    with q.consume(group=group, batch=batch, lease=lease, wait=wait) as c:
        for seq, msg in c:
            assert msg == {"n": seq}
            got.append(seq)
    out.put((os.getpid(), got))
    q.close()


def stalling_member(path, group, ready, batch, lease):
    """Take a batch, handle 3 messages, then hang until killed."""
    q = StaggerQueue(path, durability="normal")
    with q.consume(group=group, batch=batch, lease=lease, wait=False) as c:
        for i, (seq, _) in enumerate(c):
            if i == 3:
                ready.set()
                time.sleep(600)


def killing_member(path, log, killer, batch, lease, max_attempts):
    """Handle messages, logging each start; message ``killer`` kills the process."""
    q = StaggerQueue(path, durability="normal")
    with q.consume(group="g", batch=batch, lease=lease, max_attempts=max_attempts, wait=3 * lease) as c:
        for seq, _ in c:
            with open(log, "a") as f:
                f.write(f"{seq}\n")
            if seq == killer:
                os._exit(3)


def batch_member(path, group, out, start, n, lease, wait):
    """Take lists with next_batch until idle for ``wait`` s; report them."""
    q = StaggerQueue(path, durability="normal")
    start.wait(60)
    lists = []
    with q.consume(group=group, batch=n, lease=lease, wait=wait) as c:
        while True:
            items = c.next_batch()
            if not items:
                break
            assert all(msg == {"n": seq} for seq, msg in items)
            lists.append([seq for seq, _ in items])
    out.put((os.getpid(), lists))
    q.close()


def killing_batch_member(path, log, killer, n, lease, max_attempts):
    """Take lists, logging each as one line; a list holding ``killer`` kills the process."""
    q = StaggerQueue(path, durability="normal")
    with q.consume(group="g", batch=n, lease=lease, max_attempts=max_attempts, wait=3 * lease) as c:
        while True:
            seqs = [seq for seq, _ in c.next_batch()]
            if not seqs:
                break
            with open(log, "a") as f:
                f.write(" ".join(map(str, seqs)) + "\n")
            if killer in seqs:
                os._exit(3)


def following_member(path, out, last):
    """A plain member (no pool) that waits for messages; reports each seq."""
    q = StaggerQueue(path, durability="normal")
    with q.consume(group="g", batch=10, wait=120) as c:
        for seq, _ in c:
            out.put(seq)
            if seq == last:
                break
    q.close()


def run_members(target, qpath, groups, *rest):
    """One ``target(qpath, group, out, start, *rest)`` process per group
    name, started together; returns the processes (joined) and what each
    put in ``out``."""
    out, start = CTX.Queue(), CTX.Event()
    procs = [CTX.Process(target=target, args=(qpath, group, out, start, *rest)) for group in groups]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    return procs, results


def test_four_member_processes_share_20000_messages_exactly_once(qpath):
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([{"n": i} for i in range(1, 20001)])
        q.consume(group="g", wait=False).close()
    procs, results = run_members(member, qpath, ["g"] * 4, 50, 30.0, 1.0)
    assert all(p.exitcode == 0 for p in procs)
    everything = sorted(s for _, got in results for s in got)
    assert everything == list(range(1, 20001))  # every message exactly once
    assert sum(1 for _, got in results if got) >= 2  # spread over several members
    for _, got in results:
        assert got == sorted(got)  # each member sees its share in seqno order
    with StaggerQueue(qpath) as q:
        info = q.groups()["g"]
    assert (info.acked, info.in_flight, info.retrying, info.lag, info.dead) == (20000, 0, 0, 0, 0)


def test_two_groups_in_processes_each_get_everything(qpath):
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([{"n": i} for i in range(1, 2001)])
    procs, results = run_members(member, qpath, ["a", "a", "b", "b"], 20, 30.0, 1.0)
    by_pid = dict(results)
    a = sorted(by_pid[procs[0].pid] + by_pid[procs[1].pid])
    b = sorted(by_pid[procs[2].pid] + by_pid[procs[3].pid])
    assert a == b == list(range(1, 2001))


def test_member_killed_mid_batch_loses_nothing(qpath):
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([{"n": i} for i in range(1, 101)])
    ready = CTX.Event()
    victim = CTX.Process(target=stalling_member, args=(qpath, "g", ready, 20, 1.0))
    victim.start()
    assert ready.wait(60)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    assert victim.exitcode == -signal.SIGKILL
    with StaggerQueue(qpath, durability="normal") as q:
        assert q.groups()["g"].in_flight == 20  # still claimed by the dead member
        got = []
        with q.consume(group="g", batch=20, lease=30, wait=30) as c:
            for seq, msg in c:
                got.append(seq)
                if len(set(got)) == 100:
                    break
        assert sorted(set(got)) == list(range(1, 101))  # the dead member's 20 included
        assert len(got) == 100  # each once to this member
        wait_for(lambda: q.groups()["g"].acked == 100, 30)


def run_killing_members(q, qpath, target, log, killer, max_attempts, messages=20, batch=10):
    """Start members one after another (each may die on the killer) until
    the group has finished all ``messages``; a deadline, never a hang."""
    deadline = time.monotonic() + 120
    while True:
        info = q.groups().get("g")
        if info is not None and info.acked == messages:
            return
        assert time.monotonic() < deadline, f"not finished: {info}"
        p = CTX.Process(target=target, args=(qpath, log, killer, batch, 1.5, max_attempts))
        p.start()
        p.join(60)
        assert p.exitcode in (0, 3)


@pytest.mark.parametrize("max_attempts, batch", [(3, 10), (1, 10), (1, 1)])
def test_message_that_kills_its_worker_is_dead_lettered_alone(qpath, tmp_path, max_attempts, batch):
    # max_attempts=1: dead at its first death (members then claim one at a
    # time, so the death is pinned on it), delivered once, never twice.
    log = str(tmp_path / "starts.log")
    killer = 5
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([{"n": i} for i in range(1, 21)])
    with StaggerQueue(qpath) as q:
        run_killing_members(q, qpath, killing_member, log, killer, max_attempts, batch=batch)
        [dead] = q.dead_letters("g")
        assert (dead.seq, dead.msg, dead.attempts) == (killer, {"n": killer}, max_attempts)
        assert "lease" in dead.error
        info = q.groups()["g"]
        assert (info.acked, info.dead, info.in_flight, info.retrying) == (20, 1, 0, 0)
    with open(log) as f:
        starts = [int(line) for line in f]
    assert starts.count(killer) == max_attempts  # started exactly max_attempts times
    assert set(starts) == set(range(1, 21))  # the others of its batch were handled


def test_four_batch_members_share_messages_exactly_once(qpath):
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([{"n": i} for i in range(1, 5001)])
        q.consume(group="g", wait=False).close()
    procs, results = run_members(batch_member, qpath, ["g"] * 4, 25, 30.0, 1.0)
    assert all(p.exitcode == 0 for p in procs)
    lists = [lst for _, member_lists in results for lst in member_lists]
    assert sorted(s for lst in lists for s in lst) == list(range(1, 5001))  # each exactly once
    assert max(len(lst) for lst in lists) == 25 and all(lst == sorted(lst) for lst in lists)
    with StaggerQueue(qpath) as q:
        info = q.groups()["g"]
    assert (info.acked, info.in_flight, info.retrying, info.lag, info.dead) == (5000, 0, 0, 0, 0)


def test_list_that_kills_its_worker_dead_letters_only_the_killer(qpath, tmp_path):
    """A list handed out together counts one attempt for each of its messages
    when its member dies; they come back alone, so only the killer dies."""
    log = str(tmp_path / "lists.log")
    max_attempts, killer = 3, 5
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([{"n": i} for i in range(1, 21)])
    with StaggerQueue(qpath) as q:
        run_killing_members(q, qpath, killing_batch_member, log, killer, max_attempts)
        [dead] = q.dead_letters("g")
        assert (dead.seq, dead.attempts) == (killer, max_attempts) and "lease" in dead.error
        info = q.groups()["g"]
        assert (info.acked, info.dead, info.in_flight, info.retrying) == (20, 1, 0, 0)
    with open(log) as f:
        lists = [[int(s) for s in line.split()] for line in f]
    assert lists[0] == list(range(1, 11))  # the first list, handed out together, died
    assert sum(lst.count(killer) for lst in lists) == max_attempts
    assert [lst for lst in lists if killer in lst][1:] == [[killer]] * (max_attempts - 1)  # then alone
    assert {s for lst in lists for s in lst} == set(range(1, 21))


def test_pause_from_another_process_holds_a_plain_member(qpath):
    with StaggerQueue(qpath, durability="normal") as q:
        q.write_many([1, 2])
        q.consume(group="g").close()
        out = CTX.Queue()
        p = CTX.Process(target=following_member, args=(qpath, out, 4))
        p.start()
        try:
            assert sorted([out.get(timeout=60), out.get(timeout=60)]) == [1, 2]
            subprocess.run([sys.executable, "-m", "stagger_sqlite", "pause", qpath, "--group", "g"], check=True, timeout=60)
            q.write_many([3, 4])  # wakes the member: its claim hands out nothing
            with pytest.raises(queue.Empty):
                out.get(timeout=1.0)  # asserting an absence: a second to misbehave
            assert q.groups()["g"].lag == 2
            q.resume("g")
            assert sorted([out.get(timeout=60), out.get(timeout=60)]) == [3, 4]
            p.join(60)
            assert p.exitcode == 0
        finally:
            if p.is_alive():
                p.kill()
