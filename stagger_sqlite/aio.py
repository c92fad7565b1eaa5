"""asyncio: ``awrite``, ``awrite_many`` and ``aconsume``, never blocking the loop
while waiting.

Writes are short (one transaction) and run in the loop's default executor.

Consuming drives the ordinary synchronous consumer (plain or group: whatever
``StaggerQueue.consume`` builds) in the loop's thread, with its waiter in
non-blocking mode (``wakeup.nonblocking``): where the consumer would sleep, its
``Waiter.wait`` raises ``WouldWait`` instead, and the task awaits
``Waiter.wait_async``, a future resolved by the process's wake-up thread when a
ring arrives (or by a timer, or by ``close()``). So a waiting async consumer
costs no thread of its own, and a cancelled task leaves nothing behind: the
consumer is exactly as it was before the wait.

What does run in the loop's thread: each step of the consumer between waits
(a page read of ``batch`` rows, or for a group the claim/ack transaction),
which is short but is disk I/O. Writes while some writer holds the writer
lock (another process's long ``write_many``, a tool holding the lock file)
would block the loop as long, so they run in the loop's default executor: a
group member's claim, and the writes that come with making a consumer (the
group's creation, a purge), which then wait for the first ``__anext__``. A
task cancelled meanwhile leaves the step's outcome to the next
``__anext__``, so nothing is handed out that no one receives; ``close()``
then releases it unstarted. ``aclose`` and ``async with`` end a group
member (its last acks, the release of what it did not start) in the
executor too.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Optional, Tuple, TypeVar

from . import wakeup
from .groups import GroupConsumer

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a short blocking call in the running loop's default executor."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args))


_STOP = object()  # a step's outcome: the consumer stopped


class AsyncConsumer:
    """Async iterator (and async context manager) over a synchronous consumer.

    Built by :meth:`StaggerQueue.aconsume`. Attributes of the wrapped consumer
    (``position``, ``ack``, ``nack`` ...) are reachable through this object.
    """

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        #: A step run in the executor whose task was cancelled before it
        #: ended: its outcome is the next __anext__'s.
        self._pending: Optional["asyncio.Future[Any]"] = None
        self._closing = False  # close() left the end to the pending step
        # The consumer's own writes (``_begin``): now, unless a writer holds
        # the lock; then in the executor, as the first step.
        self._begun = not consumer._storage.writer_busy()
        if self._begun:
            consumer._begin()

    def __aiter__(self) -> "AsyncConsumer":
        return self

    async def __anext__(self) -> Tuple[int, Any]:
        if self._closing:
            raise StopAsyncIteration
        while True:
            try:
                if self._pending is not None or not self._begun or self._would_wait_for_writer():
                    item = await self._step_in_thread()
                else:
                    item = self._step()
            except wakeup.WouldWait as w:
                if not await w.waiter.wait_async(w.timeout):
                    raise StopAsyncIteration from None  # the queue was closed
                continue
            if item is _STOP:
                raise StopAsyncIteration
            return item  # type: ignore[no-any-return]

    def _step(self) -> Any:
        """One step of the consumer (in whatever thread runs it): an item,
        or _STOP (a StopIteration cannot cross a Future)."""
        if not self._begun:
            self._consumer._begin()
            self._begun = True
        try:
            with wakeup.nonblocking():
                return next(self._consumer)
        except StopIteration:
            return _STOP

    def _would_wait_for_writer(self) -> bool:
        """A group member about to claim (nothing claimed in memory) while
        some writer holds the lock: the claim would block the loop."""
        c = self._consumer
        return isinstance(c, GroupConsumer) and not c._rows and c._storage.writer_busy()

    async def _step_in_thread(self) -> Any:
        fut = self._pending
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(None, self._step)
            self._pending = fut
        # Shielded: a cancel of this task must not lose what the step hands
        # out (the step stays pending for the next call, or for close()).
        try:
            item = await asyncio.shield(fut)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._pending = None
            raise
        self._pending = None
        return item

    def close(self) -> None:
        """Close the wrapped consumer (as its ``close``). Idempotent.

        With a claim still running in the executor (its task was cancelled),
        the consumer is closed once the claim ends, what it claimed released
        unstarted; ``aclose`` and ``async with`` wait for that instead."""
        fut = self._pending
        if fut is None:
            self._consumer.close()  # type: ignore[attr-defined]
        elif fut.done():
            self._pending = None
            self._end(fut, None)
        elif not self._closing:
            self._closing = True
            fut.add_done_callback(lambda f: self._end(f, None))

    def _end(self, fut: "asyncio.Future[Any]", exc: Any) -> None:
        """Close the consumer after the pending step ``fut`` ended: what it
        handed out reached no one, so it is released (as on KeyboardInterrupt:
        unstarted, no attempt); otherwise as the block's end with ``exc``."""
        exit_ = getattr(self._consumer, "__exit__", None)
        handed = not fut.cancelled() and fut.exception() is None and fut.result() is not _STOP
        if exit_ is None:
            self._consumer.close()  # type: ignore[attr-defined]
        elif handed:
            exit_(KeyboardInterrupt, KeyboardInterrupt(), None)
        else:
            exit_(*(exc or (None, None, None)))

    async def aclose(self) -> None:
        await self.__aexit__(None, None, None)

    async def __aenter__(self) -> "AsyncConsumer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        fut = self._pending
        if fut is not None:
            # A claim cancelled mid-way still runs: wait for it (never two
            # steps of one consumer at once), then release what it took.
            await asyncio.wait([fut])
            if self._closing:
                return  # close() already left the end to the claim's callback
            self._pending = None
            await run_blocking(self._end, fut, exc)
            return
        # The consumer's own __exit__ when it has one (a group consumer
        # treats an exception leaving the block differently from a clean end;
        # its writes go to the executor, as a claim's do).
        exit_ = getattr(self._consumer, "__exit__", None)
        if exit_ is not None:
            await run_blocking(exit_, *exc)
        else:
            self._consumer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)
