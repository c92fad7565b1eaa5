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
which is short but is disk I/O. Steps are not moved to a thread on purpose: a
step cancelled while running in a thread would hand out a message that no one
receives.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Iterator, Tuple, TypeVar

from . import wakeup

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a short blocking call in the running loop's default executor."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args))


class AsyncConsumer:
    """Async iterator (and async context manager) over a synchronous consumer.

    Built by :meth:`StaggerQueue.aconsume`. Attributes of the wrapped consumer
    (``position``, ``ack``, ``nack`` ...) are reachable through this object.
    """

    def __init__(self, consumer: Iterator[Tuple[int, Any]]) -> None:
        self._consumer = consumer

    def __aiter__(self) -> "AsyncConsumer":
        return self

    async def __anext__(self) -> Tuple[int, Any]:
        while True:
            try:
                with wakeup.nonblocking():
                    return next(self._consumer)
            except StopIteration:
                raise StopAsyncIteration from None
            except wakeup.WouldWait as w:
                if not await w.waiter.wait_async(w.timeout):
                    raise StopAsyncIteration from None  # the queue was closed

    def close(self) -> None:
        """Close the wrapped consumer (as its ``close``). Idempotent."""
        self._consumer.close()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncConsumer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # The consumer's own __exit__ when it has one (a group consumer
        # treats an exception leaving the block differently from a clean end).
        exit_ = getattr(self._consumer, "__exit__", None)
        if exit_ is not None:
            exit_(*exc)
        else:
            self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)
