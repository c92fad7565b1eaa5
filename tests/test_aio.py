"""asyncio: awrite, awrite_many, aconsume (waiting never blocks the loop)."""

import asyncio
import subprocess
import sys
import threading

import pytest

from stagger_sqlite import StaggerQueue
from stagger_sqlite import wakeup

DEADLINE = 60

WRITE = "import sys\nfrom stagger_sqlite import StaggerQueue\nStaggerQueue(sys.argv[1]).write_many(sys.argv[2:])"


async def write_from_other_process(path, *msgs):
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITE, path, *msgs)
    assert await asyncio.wait_for(p.wait(), DEADLINE) == 0


def test_awrite_and_awrite_many(qpath):
    async def main():
        with StaggerQueue(qpath) as q:
            assert await q.awrite({"a": 1}) == 1
            assert await q.awrite_many(iter(["b", "c"])) == [2, 3]
            assert await q.awrite_many([]) == []
            return list(q.consume(wait=False))

    assert asyncio.run(main()) == [(1, {"a": 1}), (2, "b"), (3, "c")]


def test_aconsume_wait_lets_other_tasks_run(qpath):
    async def main():
        q = StaggerQueue(qpath)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def consume():
            got = []
            async for seq, msg in q.aconsume(wait=True):
                got.append((seq, msg))
                if len(got) == 2:
                    return got

        tick = asyncio.create_task(ticker())
        consumer = asyncio.create_task(consume())
        while ticks < 20:  # the consumer is waiting, the loop keeps ticking
            await asyncio.sleep(0.01)
        assert not consumer.done()
        await write_from_other_process(qpath, "x", "y")
        got = await asyncio.wait_for(consumer, DEADLINE)
        tick.cancel()
        q.close()
        return got

    assert asyncio.run(main()) == [(1, "x"), (2, "y")]


def test_cancelling_a_waiting_aconsume_leaves_the_queue_usable(qpath):
    async def main():
        q = StaggerQueue(qpath)
        await q.awrite("one")
        c = q.aconsume(wait=True)

        async def take(n):
            out = []
            async for item in c:
                out.append(item)
                if len(out) == n:
                    return out

        assert await asyncio.wait_for(take(1), DEADLINE) == [(1, "one")]
        waiting = asyncio.create_task(take(1))
        await asyncio.sleep(0.1)
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            pass
        # Nothing of the cancelled wait stays registered with the wake-up hub.
        hub = wakeup._HUB
        if hub is not None:
            assert all(not ch.listeners for ch in hub.channels.values())
        # The same consumer, a new async one and a sync one all still work.
        await write_from_other_process(qpath, "two")
        assert await asyncio.wait_for(take(1), DEADLINE) == [(2, "two")]
        assert [s async for s, _ in q.aconsume(wait=False)] == [1, 2]
        assert [s for s, _ in q.consume(wait=False)] == [1, 2]
        assert await q.awrite("three") == 3
        q.close()

    asyncio.run(main())


def test_aconsume_wait_seconds_ends_and_passes_arguments_through(qpath):
    async def main():
        with StaggerQueue(qpath) as q:
            await q.awrite_many(range(5))
            async with q.aconsume(2, batch=2, wait=0.3) as c:
                got = [item async for item in c]
                assert c.position == 5
            return got

    assert asyncio.run(main()) == [(3, 2), (4, 3), (5, 4)]


def test_close_from_another_thread_ends_aconsume(qpath):
    async def main():
        q = StaggerQueue(qpath)
        loop = asyncio.get_running_loop()

        async def consume():
            return [item async for item in q.aconsume(wait=True)]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        await loop.run_in_executor(None, q.close)
        return await asyncio.wait_for(task, DEADLINE)

    assert asyncio.run(main()) == []


@pytest.mark.parametrize("group", [None, "g"])
def test_closing_a_waiting_aconsume_ends_its_loop(qpath, monkeypatch, group):
    # The consumer's own close() (not the queue's) ends a task awaiting new
    # messages at once: the safety poll is made an hour, so nothing else could.
    monkeypatch.setattr(wakeup, "SAFETY_POLL", 3600.0)

    async def main():
        with StaggerQueue(qpath) as q:
            q.write("one")
            c = q.aconsume(wait=True, group=group)
            got = []

            async def consume():
                async for item in c:
                    got.append(item)

            task = asyncio.create_task(consume())
            while not (got and c._waiter._wake_async is not None):  # it awaits the next message
                await asyncio.sleep(0.01)
            c.close()
            await asyncio.wait_for(task, DEADLINE)
            return got, (q.groups()[group].acked if group else None)

    got, acked = asyncio.run(main())
    assert got == [(1, "one")]
    assert acked == (1 if group else None)


async def cancel_a_claim_waiting_for_the_lock(c, qpath):
    """Hold the writer lock (returns the holder: release it), start c's next
    claim (it waits for the lock in a thread) and cancel the task awaiting it."""
    import filelock

    holder = filelock.FileLock(qpath + ".lock")
    holder.acquire()
    first = asyncio.create_task(c.__anext__())
    while c._pending is None:
        await asyncio.sleep(0.001)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    return holder


def test_a_group_claim_waiting_for_the_writer_lock_does_not_block_the_loop(qpath):
    """While another writer holds the lock, an async member's claim (a
    write) waits in a thread: the loop's other tasks run on; a task cancelled
    meanwhile loses nothing (the claim's message goes to the next call)."""
    async def main():
        with StaggerQueue(qpath, timeout=DEADLINE) as q:
            q.write_many(["a", "b"])
            c = q.aconsume(group="g", batch=1, wait=True)
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticker = asyncio.create_task(tick())
            holder = await cancel_a_claim_waiting_for_the_lock(c, qpath)
            ticks = 0
            while ticks < 20:  # the loop runs while the claim waits for the lock
                await asyncio.sleep(0.001)
            assert not c._pending.done()  # the claim's thread goes on: its outcome is kept
            holder.release()
            got = [await asyncio.wait_for(c.__anext__(), DEADLINE), await asyncio.wait_for(c.__anext__(), DEADLINE)]
            ticker.cancel()
            await c.aclose()
            return got, q.groups()["g"]

    got, info = asyncio.run(main())
    assert got == [(1, "a"), (2, "b")]  # nothing lost to the cancel, nothing twice
    assert (info.acked, info.in_flight) == (2, 0)


def test_closing_after_a_cancelled_claim_releases_what_it_claimed(qpath):
    async def main():
        with StaggerQueue(qpath, timeout=DEADLINE) as q:
            q.write_many(["a", "b"])
            c = q.aconsume(group="g", batch=2, wait=True)
            holder = await cancel_a_claim_waiting_for_the_lock(c, qpath)
            c.close()  # the claim still waits: released once it ends
            holder.release()
            while not c._consumer._closed:  # the claim ended, then the close
                await asyncio.sleep(0.01)
            return [m for _, m in q.consume(group="g", wait=False)], q.groups()["g"]

    got, info = asyncio.run(main())
    assert got == ["a", "b"]  # released unstarted, at once (no lease wait)
    assert (info.acked, info.dead) == (2, 0)


def test_aclose_inside_async_with_during_a_cancelled_claim_releases_it(qpath):
    # close is idempotent: aclose() then the block's end, while the claim of a
    # cancelled task still runs. Both wait for it; what it claimed comes back
    # at once (unstarted, no attempt), and the queue's close comes after.
    async def main(q):
        async with q.aconsume(group="g", batch=3, lease=60) as c:
            holder = await cancel_a_claim_waiting_for_the_lock(c, qpath)
            asyncio.get_running_loop().call_later(0.2, holder.release)
            await c.aclose()  # waits for the claim (the lock is freed meanwhile)
        assert c._consumer._closed

    with StaggerQueue(qpath, timeout=DEADLINE) as q:
        q.write_many(["a", "b", "c"])
        asyncio.run(main(q))
        info = q.groups()["g"]
        assert (info.in_flight, info.retrying, info.dead) == (0, 0, 0)
        assert [m for _, m in q.consume(group="g", wait=False)] == ["a", "b", "c"]


def test_scheduled_message_reaches_aconsume(qpath):
    async def main():
        with StaggerQueue(qpath) as q:
            q.schedule("later", delay=0.2)
            async for item in q.aconsume(wait=DEADLINE):
                return item

    assert asyncio.run(main()) == (1, "later")


def test_many_async_consumers_share_one_wakeup_thread(qpath):
    async def main():
        with StaggerQueue(qpath) as q:
            async def one():
                async for item in q.aconsume(wait=DEADLINE):
                    return item

            before = threading.active_count()
            tasks = [asyncio.create_task(one()) for _ in range(50)]
            await asyncio.sleep(0.2)
            during = threading.active_count()
            await write_from_other_process(qpath, "all")
            got = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
            return got, during - before

    got, extra_threads = asyncio.run(main())
    assert got == [(1, "all")] * 50
    assert extra_threads <= 1  # at most the process's wake-up thread


ASYNC_POLL_CONSUMER = """
import asyncio, sys
from stagger_sqlite import StaggerQueue, wakeup

async def main():
    assert wakeup.mechanism() == "poll"
    with StaggerQueue(sys.argv[1]) as q:
        print("ready", flush=True)
        got = []
        async for seq, msg in q.aconsume(wait=60):
            got.append(msg)
            if len(got) == 3:
                break
        print(got, flush=True)

asyncio.run(main())
"""


def test_aconsume_with_the_poll_fallback(qpath):
    import os

    StaggerQueue(qpath).close()
    p = subprocess.Popen([sys.executable, "-c", ASYNC_POLL_CONSUMER, qpath], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, STAGGER_SQLITE_WAKEUP="poll"))
    assert p.stdout.readline().strip() == "ready"
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "b"])
        q.write("c")
    out, err = p.communicate(timeout=DEADLINE)
    assert p.returncode == 0, err
    assert out.strip() == "['a', 'b', 'c']"


def test_making_and_ending_async_consumers_behind_a_held_writer_lock_does_not_block_the_loop(qpath):
    """A consumer's own writes (a new group's creation, a purge, a member's
    last acks at aclose) wait for the writer lock in a thread: the loop's
    other tasks run on meanwhile, and each write happens once it is free."""
    import filelock

    async def ticks_while(pending):
        """Let the loop tick 20 times while ``pending`` is not done."""
        ticks = 0
        while ticks < 20:
            await asyncio.sleep(0.001)
            ticks += 1
        assert not pending.done()

    async def main():
        with StaggerQueue(qpath, timeout=DEADLINE) as q:
            q.write_many(["a", "b"])
            holder = filelock.FileLock(qpath + ".lock")
            with holder:
                member = q.aconsume(group="new", batch=1)  # the group's creation waits
                first = asyncio.create_task(member.__anext__())
                await ticks_while(first)
                assert "new" not in q.groups()  # not made yet
            got = [await asyncio.wait_for(first, DEADLINE)]
            with holder:
                end = asyncio.create_task(member.aclose())  # finishing (1, "a") is a write
                await ticks_while(end)
            await asyncio.wait_for(end, DEADLINE)
            with holder:
                plain = q.aconsume(ack=1, purge=1, wait=False)  # the purge waits
                second = asyncio.create_task(plain.__anext__())
                await ticks_while(second)
                assert len(q) == 2  # nothing purged yet
            got.append(await asyncio.wait_for(second, DEADLINE))
            await plain.aclose()
            return got, q.groups()["new"], len(q)

    got, info, stored = asyncio.run(main())
    assert got == [(1, "a"), (2, "b")]
    assert (info.acked, info.in_flight) == (1, 0)
    assert stored == 1  # the purge ran once the lock was free
