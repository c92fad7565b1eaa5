"""The worker pool: a handler run over a consumer group by supervised processes.

``WorkerPool`` starts ``processes`` worker processes (multiprocessing, spawn),
each a member of one consumer group, and keeps them running:

- each message is passed to the handler; returning acks it, raising nacks it
  (retried with backoff by the group; dead-lettered after ``max_attempts``);
- ``batch_handler=True`` passes a list of up to ``batch`` messages instead,
  handed out together (``GroupConsumer.next_batch``: one write transaction
  per list);
- ``rate`` limits hand-outs for the whole group, across every process and
  every pool (``control.RateLimiter``, state in the queue file); a handler
  of one message then gets each from a claim of its own, so the limit says
  when handlers start;
- a paused group (``StaggerQueue.pause``) gets no hand-outs: every claim
  checks the flag;
- a dropped group (``StaggerQueue.drop_group``) stops the pool: it is never
  created again under the user's feet;
- SIGTERM/SIGINT stop taking messages; what is in hand is finished (or, if
  claimed but not started, released at once) and the pool exits cleanly;
- a worker process that dies is restarted; what it held comes back through
  its lease (SPEC §4);
- ``until_idle``: the pool exits once the group had nothing claimable, nothing
  in flight and nothing retrying for that many seconds.

Signal handlers only set flags: the loops look at them between messages.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Tuple, Union

from . import control
from .errors import LockTimeoutError, StorageFullError
from .groups import create_group
from .queue import StaggerQueue
from .validate import check_bound, check_int, check_seconds

log = logging.getLogger("stagger_sqlite.workers")

Handler = Union[str, Callable[[Any], Any]]

#: Seconds a worker waits for a message before it looks at its stop flag again.
POLL = 0.25
#: Restart backoff for a worker process that keeps dying at start.
RESTART_MIN, RESTART_MAX = 0.1, 5.0


class HandlerError(ValueError):
    """The handler spec is not ``module:function`` naming a callable."""


def resolve_handler(spec: Handler) -> Callable[[Any], Any]:
    """Return the callable named by ``"package.module:function"`` (or ``spec``
    itself when it is callable).

    Raises:
        HandlerError: a malformed spec, a module that fails to import, or a
            name that is missing or not callable.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise HandlerError(f"bad handler {spec!r}: use module:function, e.g. myapp.tasks:send")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module itself failed
        raise HandlerError(f"handler {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise HandlerError(f"handler {spec}: {module_name} has no {attr}")
    if not callable(obj):
        raise HandlerError(f"handler {spec}: {attr} is not callable")
    return obj


def _check_sendable(handler: Handler) -> None:
    """Workers are spawned: a callable handler goes to them pickled, that
    is by its module and name. A lambda, a nested function or a method of
    an object that cannot be pickled would fail at ``run()``, in the middle
    of starting the pool; refuse it here instead.

    Raises:
        HandlerError: the handler cannot be sent to a worker process.
    """
    if isinstance(handler, str):
        return
    try:
        pickle.dumps(handler)
    except Exception as e:
        raise HandlerError(
            f"handler {handler!r} cannot be sent to worker processes ({type(e).__name__}: {e}): "
            "use a function defined at module level, or a 'module:function' string"
        ) from None


@dataclass(frozen=True)
class WorkerOptions:
    """What each worker process needs; sent to it at spawn."""

    path: str
    group: str
    codec: Any = "cbor"
    batch: int = 50
    batch_handler: bool = False
    lease: float = 30.0
    max_attempts: int = 5
    rate: Optional[control.Rate] = None
    #: (level of the ``stagger_sqlite`` logger, whether the root logger is configured)
    log_level: Optional[Tuple[int, bool]] = None


class Worker:
    """One member of the group, in one process: claims, runs the handler, acks.

    ``run()`` loops until ``stop()`` (which SIGTERM/SIGINT call in a pool's
    worker process) or until its group is dropped. Pause and the rate limit
    are the claim's business (``GroupConsumer``): a worker just asks for the
    next message, or list, and waits at most POLL seconds between looks at
    its stop flag.
    """

    def __init__(self, opts: WorkerOptions, handler: Callable[[Any], Any]) -> None:
        self.opts = opts
        self.handler = handler
        self.q = StaggerQueue(opts.path, codec=opts.codec)
        self.stopping = False
        self.done = 0

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        o = self.opts
        try:
            # With a rate, a handler of one message gets each message from a
            # claim of its own: a claim of several would hand them all out
            # at once while the handler starts on them one after another,
            # and the limit would no longer say when handlers start.
            batch = 1 if o.rate and not o.batch_handler else o.batch
            c = self._passing(lambda: self.q.consume(
                group=o.group, batch=batch, lease=o.lease, max_attempts=o.max_attempts, wait=POLL))
            if c is None:
                return
            with c:
                c.claim_limit = control.RateLimiter(o.group, o.rate) if o.rate else None
                step = self._batch if o.batch_handler else self._one
                while not self.stopping and not c.dropped:
                    step(c)
                if c.dropped:
                    log.warning("%s: the group was dropped; this worker stops", o.group)
        finally:
            self.q.close()  # closing the consumer (end of `with`) finished what it held

    def _passing(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, a write (making the member, a claim), retried with
        backoff while it fails for a passing reason (a full disk, the lock
        held past the timeout) instead of the process dying on it; None if
        the worker was stopped meanwhile. Only for writes whose failure
        leaves the member as it was (a claim keeps what it was to finish)."""
        delay = RETRY_MIN
        while not self.stopping:
            try:
                return fn()
            except (StorageFullError, LockTimeoutError) as e:
                log.warning("%s: %s; retrying in %.1f s", self.opts.group, e, delay)
                until = time.monotonic() + delay
                while not self.stopping and time.monotonic() < until:
                    time.sleep(min(POLL, max(0.0, until - time.monotonic())))
                delay = min(delay * 2, RETRY_MAX)
        return None

    def _one(self, c: Any) -> None:
        """Handle one message (claims of up to ``batch`` behind the scenes)."""
        # not iter(c): a dropped generator would release
        item = self._passing(lambda: next(c, None))
        if item is None:
            return  # idle for POLL seconds, or stopping: look at the flags
        seq, msg = item
        self._call(c, [seq], msg)

    def _batch(self, c: Any) -> None:
        """Handle one list of up to ``batch`` messages, claimed (and, at the
        next call, finished) in one write transaction."""
        items = self._passing(c.next_batch)
        if items:
            self._call(c, [seq for seq, _ in items], [msg for _, msg in items])

    def _call(self, c: Any, seqs: List[int], arg: Any) -> None:
        started = time.monotonic()
        try:
            self.handler(arg)
        except BaseException as e:
            # SystemExit and KeyboardInterrupt too: in a worker process the
            # signals only set a flag, so these come from the handler itself.
            # Let through, they would end the worker with the message
            # released unstarted, uncounted: restarted, it would take the
            # same message again, forever.
            error = f"{type(e).__name__}: {e}"
            c.nack_all(error=error)
            log.warning(
                "%s: seq=%s failed in %.1f ms, will retry or dead-letter: %s",
                self.opts.group, _seqs(seqs), (time.monotonic() - started) * 1000, error,
            )
            return
        self.done += len(seqs)
        log.debug("%s: seq=%s ok in %.1f ms", self.opts.group, _seqs(seqs), (time.monotonic() - started) * 1000)


#: A worker whose claim fails for a passing reason (a full disk, a lock
#: timeout) retries after RETRY_MIN seconds, doubling up to RETRY_MAX.
RETRY_MIN, RETRY_MAX = 0.1, 10.0


def _seqs(seqs: List[int]) -> str:
    return str(seqs[0]) if len(seqs) == 1 else f"{seqs[0]}..{seqs[-1]}({len(seqs)})"


def _child_main(opts: WorkerOptions, handler: Handler, pool_pid: Optional[int] = None) -> None:
    """Entry point of a worker process (``pool_pid``: the pool's, given at
    the spawn, so a pool that died while this one started is seen too)."""
    if opts.log_level is not None:
        level, configured = opts.log_level
        logging.getLogger("stagger_sqlite").setLevel(level)
        if configured:  # the parent logs somewhere: so do its workers, alike
            logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(levelname)s %(message)s")
    worker = Worker(opts, resolve_handler(handler))

    def on_signal(signum: int, frame: Any) -> None:
        worker.stop()  # only a flag: the loop finishes what it holds

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_stop_when_orphaned, args=(worker, pool_pid or os.getppid()), daemon=True).start()
    worker.run()


#: Seconds between a worker's looks at whether its pool still runs.
ORPHAN_CHECK = 0.5


def _stop_when_orphaned(worker: "Worker", parent: int) -> None:
    """A pool killed with SIGKILL cannot stop its workers: each stops itself
    (finishing what it holds, as on SIGTERM) once its parent is gone."""
    while not worker.stopping:
        if os.getppid() != parent:
            log.warning("%s: the pool (pid %d) is gone; this worker stops", worker.opts.group, parent)
            worker.stop()
            return
        time.sleep(ORPHAN_CHECK)


def group_idle(q: Any, group: str) -> bool:
    """True when ``group`` has nothing claimable, in flight or retrying."""
    return _idle(q.groups().get(group))


def _idle(info: Any) -> bool:
    return info is not None and info.lag == 0 and info.in_flight == 0 and info.retrying == 0


class IdleClock:
    """How long a group has been idle (``until_idle``), from looks taken
    now and then: a look that finds the group idle counts only if nothing
    moved since the last one (no message written, handed out, finished or
    dead-lettered), so a message written and handled between two looks
    is not missed."""

    def __init__(self) -> None:
        self._since: Optional[float] = None
        self._last: Optional[tuple] = None

    def idle_for(self, info: Any) -> float:
        """Seconds the group has been idle as of this look (0: busy)."""
        now = time.monotonic()
        mark = None if info is None else (info.acked, info.lag, info.dead, info.delivered)
        moved, self._last = mark != self._last, mark
        if moved or not _idle(info):
            self._since = None
            return 0.0
        self._since = self._since or now
        return now - self._since


class WorkerPool:
    """Run ``handler`` over consumer group ``group`` of the queue at ``path``
    in ``processes`` supervised worker processes.

    Args:
        path: the queue file (created if missing).
        group: the consumer group the workers share.
        handler: ``"module:function"`` or a module-level function; called with
            each message (or, with ``batch_handler``, a list of messages).
            Returning acks; raising nacks (retry with backoff, dead letter
            after ``max_attempts``).
        processes: worker processes (>= 1).
        batch: messages claimed per round trip, and the most a batch handler
            gets at once.
        batch_handler: call the handler with lists of messages.
        lease: seconds a worker may hold a message before it is redelivered.
        max_attempts: deliveries before a message is dead-lettered.
        rate: ``"N/s"``, ``"N/m"`` or ``"N/h"``: at most N hand-outs in any
            window of that length for the whole group, every process and
            every pool together.
        until_idle: seconds; ``run()`` returns once the group has been idle
            (nothing claimable, in flight or retrying) that long.
        codec: the queue's codec.
        stop_timeout: seconds ``stop`` waits for a worker to finish what it
            holds before killing it (its messages then come back by lease).

    Raises:
        ValueError: a bad argument; ``HandlerError`` (a ValueError) for a
            handler that cannot be imported.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        group: str,
        handler: Handler,
        *,
        processes: int = 1,
        batch: int = 50,
        batch_handler: bool = False,
        lease: float = 30.0,
        max_attempts: int = 5,
        rate: Union[None, str, control.Rate] = None,
        until_idle: Optional[float] = None,
        codec: Any = "cbor",
        stop_timeout: float = 60.0,
    ) -> None:
        check_int("processes", processes, 1)
        batch = check_bound("batch", batch, 1)
        max_attempts = check_bound("max_attempts", max_attempts, 1)
        check_seconds("lease", lease, allow_none=False, positive=True)
        self.until_idle = check_seconds("until_idle", until_idle)
        self.stop_timeout = check_seconds("stop_timeout", stop_timeout, allow_none=False)
        if not isinstance(group, str) or not group:
            raise ValueError(f"`group` must be a non-empty string, not {group!r}")
        if isinstance(rate, str):
            rate = control.parse_rate(rate)
        elif rate is not None and not isinstance(rate, control.Rate):
            raise ValueError(f"`rate` must be like '100/s', '5/m', '1000/h' (or None), not {rate!r}")
        resolve_handler(handler)  # fail here, in the caller's process, not in every child
        _check_sendable(handler)
        self.handler = handler
        self.processes = processes
        self.opts = WorkerOptions(
            path=os.fspath(path), group=group, codec=codec, batch=batch, batch_handler=batch_handler,
            lease=float(lease), max_attempts=max_attempts, rate=rate,
        )
        self._stop = threading.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: List[Any] = []
        #: Worker processes started again after they died.
        self.restarts = 0

    def pids(self) -> List[int]:
        """Process ids of the live workers."""
        return [p.pid for p in list(self._procs) if p.is_alive() and p.pid]

    def stop(self) -> None:
        """Ask ``run()`` to stop its workers gracefully and return. Safe from
        a signal handler or another thread."""
        self._stop.set()

    def _spawn(self, index: int) -> multiprocessing.process.BaseProcess:
        level = (logging.getLogger("stagger_sqlite").getEffectiveLevel(), bool(logging.getLogger().handlers))
        opts = replace(self.opts, log_level=level)
        p = self._ctx.Process(
            target=_child_main, args=(opts, self.handler, os.getpid()), name=f"{self.opts.group}-worker-{index}", daemon=False
        )
        p.start()
        return p

    def run(self) -> int:
        """Start the workers and supervise them until ``stop()``, SIGTERM or
        SIGINT (in the main thread), ``until_idle``, or the group is dropped
        (``StaggerQueue.drop_group``). Returns 0."""
        installed = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                installed[sig] = signal.signal(sig, lambda s, f: self._stop.set())
        q = StaggerQueue(self.opts.path, codec=self.opts.codec)
        procs = self._procs = []
        started: List[float] = []
        backoff = [RESTART_MIN] * self.processes
        try:
            # Created here, so a group missing later was dropped (see below).
            create_group(q, self.opts.group)
            for i in range(self.processes):
                procs.append(self._spawn(i))
                started.append(time.monotonic())
            log.info("%s: %d worker(s) started on %s", self.opts.group, self.processes, self.opts.path)
            idle = IdleClock()
            while not self._stop.wait(0.1):
                for i, p in enumerate(procs):
                    if p.is_alive() or self._stop.is_set():
                        continue
                    if self.opts.group not in q.groups():
                        # Dropped: a new worker would create the group again.
                        log.warning("%s: the group was dropped; stopping", self.opts.group)
                        self._stop.set()
                        break
                    # A worker died (killed, or crashed outside the handler).
                    quick = time.monotonic() - started[i] < 2.0
                    backoff[i] = min(backoff[i] * 2, RESTART_MAX) if quick else RESTART_MIN
                    log.warning("%s: worker %s exited (code %s); restarting", self.opts.group, p.name, p.exitcode)
                    if quick and self._stop.wait(backoff[i]):
                        break
                    procs[i] = self._spawn(i)
                    started[i] = time.monotonic()
                    self.restarts += 1
                if self.until_idle is not None and not self._stop.is_set():
                    if idle.idle_for(q.groups().get(self.opts.group)) >= self.until_idle:
                        log.info("%s: idle for %.1f s, stopping", self.opts.group, self.until_idle)
                        break
        finally:
            self._shutdown(procs)
            q.close()
            for sig, old in installed.items():
                signal.signal(sig, old)
        return 0

    def _shutdown(self, procs: List[Any]) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker finishes what it holds
        deadline = time.monotonic() + self.stop_timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("%s: worker %s did not stop in %.0f s; killing it", self.opts.group, p.name, self.stop_timeout)
                p.kill()
                p.join()
