"""kill -9 torture: producers, a reader and a purger killed at random moments.

Several producer processes (``write`` and ``write_many``; ``durability``
"full" and "normal"), a plain consumer and
a purger run on one queue file; every so often one of them, chosen at random,
gets SIGKILL at a random moment (during a commit, a checkpoint, an incremental
vacuum, a lock hand-over, start-up...) and is restarted. At the end:

- every write that returned is stored exactly once, at the seqno it
  returned, with its content (except what the purger meant to remove);
- nothing is stored that no producer meant to write; a ``write_many`` batch
  is all or nothing, at consecutive seqnos;
- the reader saw strictly increasing seqnos across all its restarts, each
  the message stored under that seqno;
- seqnos are never reused: after purging everything, the next write gets
  ``last_seq + 1``;
- ``PRAGMA integrity_check`` passes.

Bounded run: ~10 s. Long run: ``tox -e torture`` (STAGGER_TORTURE_SECONDS).
"""

import os
import random
import time

from stagger_sqlite import StaggerQueue
from tests.faults import (
    check_history,
    figure,
    kill9,
    purged_upto,
    read_logs,
    read_member_logs,
    scaled,
    spawn,
    torture_seconds,
)


def test_kill9_producers_reader_purger(tmp_path):
    path = str(tmp_path / "q.db")
    StaggerQueue(path).close()
    rnd = random.Random()
    seed = rnd.randrange(2**32)
    rnd.seed(seed)
    duration = torture_seconds(10.0)

    roles = [("write", 0), ("write", 1), ("write_many", 2), ("write_many", 3), ("reader", 4), ("purger", 5)]
    generation = {i: 0 for _, i in roles}
    logs = []

    def start(role, i):
        gen = generation[i]
        generation[i] += 1
        if role == "reader":
            return spawn("reader", path, str(tmp_path / "reader.log"))
        if role == "purger":
            return spawn("purger", path, str(tmp_path / "purger.log"), 5000)
        log = str(tmp_path / f"p{i}g{gen}.log")
        logs.append(log)
        # Half the producers use durability="normal": it too must survive any
        # process crash (only power loss may cost it the last commits).
        durability = "normal" if i in (1, 2) else "full"
        return spawn("producer", path, log, f"p{i}g{gen}", role, rnd.randrange(2**32), durability)

    procs = {i: start(role, i) for role, i in roles}
    kills = 0
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.02, 0.4))
            role, i = rnd.choice(roles)
            p = procs[i]
            assert p.poll() is None, f"{role} {i} exited by itself with status {p.returncode}"
            kill9(p)
            kills += 1
            procs[i] = start(role, i)
    finally:
        for p in procs.values():
            kill9(p)

    history = read_logs(logs)
    purged = purged_upto(str(tmp_path / "purger.log"))
    figures = check_history(path, history, purged)

    # The reader: strictly increasing across restarts, and each seq is the
    # message stored (or returned) under it.
    by_seq = {seq: pid for pid, seq in history.returned.items()}
    with StaggerQueue(path) as q:
        for seq, msg in q.consume(0, wait=False):
            by_seq[seq] = msg["id"]
        last = q.last_seq
        seen = []
        with open(tmp_path / "reader.log") as f:
            for line in f:
                seq, pid = line.split()
                seen.append(int(seq))
                if int(seq) in by_seq:
                    assert by_seq[int(seq)] == pid, f"reader saw {pid} at seq {seq}"
        assert seen == sorted(set(seen)), "the reader saw a seqno twice or out of order"
        # Never reused: not after purging everything, not after all the kills.
        q.purge()
        assert q.write({"id": "after"}) == last + 1

    figure(
        "kill -9 torture",
        seconds=duration,
        seed=seed,
        kills=kills,
        write_calls_returned=history.calls_returned,
        messages_returned=figures["returned"],
        stored_at_end=figures["stored"],
        calls_in_doubt_at_kill=figures["calls_in_doubt"],
        reader_deliveries=len(seen),
        purged_upto=purged,
        lost=0,
    )
    assert kills > 0 and history.calls_returned > 0


def test_kill9_group_members(tmp_path):
    """Producers and members of one consumer group, all killed at random.

    - every message is finished by the group at least once (``acked`` reaches
      ``last_seq`` with nothing in flight or waiting, no dead letter);
    - nothing acked comes back: no hand-out of a message starts after an
      explicit ``ack`` of it returned True;
    - every write that returned is stored, as in the producer torture.
    """
    path = str(tmp_path / "q.db")
    StaggerQueue(path).close()
    rnd = random.Random()
    seed = rnd.randrange(2**32)
    rnd.seed(seed)
    duration = torture_seconds(8.0)
    lease = 1.0
    roles = [("write", 0), ("write_many", 1), ("member", 2), ("member", 3), ("member", 4)]
    generation = {i: 0 for _, i in roles}
    plogs, mlogs = [], []

    def start(role, i):
        gen = generation[i]
        generation[i] += 1
        log = str(tmp_path / f"{role}{i}g{gen}.log")
        if role == "member":
            mlogs.append(log)
            return spawn("member", path, log, "g", rnd.randrange(2**32), lease)
        plogs.append(log)
        return spawn("producer", path, log, f"p{i}g{gen}", role, rnd.randrange(2**32), "full", 100)

    procs = {i: start(role, i) for role, i in roles}
    kills = 0
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.05, 0.5))
            role, i = rnd.choice(roles)
            p = procs[i]
            if p.poll() is None:
                kill9(p)
                kills += 1
            else:
                assert p.returncode == 0, f"{role} {i} failed with status {p.returncode}"
            procs[i] = start(role, i)
    finally:
        for p in procs.values():
            kill9(p)

    # Drain: one more member, not killed, takes over what the dead held once
    # their leases expire.
    final = str(tmp_path / "final.log")
    mlogs.append(final)
    drain = spawn("member", path, final, "g", seed, lease, lease * 3)
    assert drain.wait(120) == 0

    history = read_logs(plogs)
    figures = check_history(path, history)
    delivered, acked, nacks = read_member_logs(mlogs)
    with StaggerQueue(path) as q:
        last = q.last_seq
        info = q.groups()["g"]
        assert q.dead_letters("g") == []
    assert info.acked == last and info.in_flight == 0 and info.retrying == 0, info
    assert sorted(delivered) == list(range(1, last + 1)), "a message was never handed out"
    for seq, t_ack in acked.items():
        late = [t for t in delivered[seq] if t > t_ack]
        assert not late, f"seq {seq} was handed out again after its ack returned"
    deliveries = sum(len(v) for v in delivered.values())
    figure(
        "kill -9 group members",
        seconds=duration,
        seed=seed,
        kills=kills,
        messages=last,
        deliveries=deliveries,
        redeliveries=deliveries - len(delivered),
        explicit_acks=len(acked),
        nacks=nacks,
        writes_returned=figures["returned"],
        lost=0,
    )


def test_kill9_while_creating(tmp_path):
    """Processes racing to create the same new queue, killed at random
    moments of the creation: whatever is left opens as a queue (or is not
    there yet, and is created), the invariants hold, and no temporary file
    of a killed creator is left beside the queue."""
    from tests.faults import payload

    rnd = random.Random()
    rounds = scaled(8, 60)
    leftovers = 0
    for r in range(rounds):
        d = tmp_path / f"r{r}"
        d.mkdir()
        path = str(d / "q.db")
        logs = [str(d / f"p{i}.log") for i in range(3)]
        procs = [spawn("producer", path, logs[i], f"r{r}p{i}", "write", i, "full", 5) for i in range(3)]
        time.sleep(rnd.uniform(0.0, 0.6))
        for p in procs:
            kill9(p)
        history = read_logs(logs)
        with StaggerQueue(path) as q:
            history.intents.append(["after"])
            history.returned["after"] = q.write(payload("after"))
        check_history(path, history)
        leftovers += len([n for n in os.listdir(d) if ".tmp-" in n])
    figure("kill -9 during creation", rounds=rounds, stray_temporary_files=leftovers, lost=0)
    # A creator killed mid-creation leaves its temporary file; the next
    # creation (which holds the writer lock, as every creator does while its
    # temporary exists) removes it.
    assert leftovers == 0
