"""HTTP in and out: ``serve`` (POST body -> write) and ``forward`` (messages ->
POST to URLs, each URL its own consumer group).

Both use the standard library only: ``http.server.ThreadingHTTPServer`` to
serve, and one persistent ``http.client`` connection per destination to
forward (connection reuse and timeouts without a new dependency).
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, List, Optional, Tuple

import cbor2

from .errors import EncodeError, LockTimeoutError, QueueClosedError, StaggerError, StorageFullError
from .validate import check_seconds

log = logging.getLogger("stagger_sqlite.http")

#: The header carrying a message's seqno, in replies (serve) and requests (forward).
SEQ_HEADER = "Stagger-Seq"


# -- serve -------------------------------------------------------------------


def decode_body(content_type: str, body: bytes) -> Any:
    """The message a POST carries: decoded JSON or CBOR per ``Content-Type``,
    otherwise the raw bytes.

    Raises:
        ValueError: the body is not valid JSON / CBOR.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        try:
            return json.loads(body)
        except ValueError as e:
            raise ValueError(f"bad JSON body: {e}") from None
        except RecursionError:
            raise ValueError("bad JSON body: nested too deeply") from None
    if kind == "application/cbor":
        fp = io.BytesIO(body)
        try:
            value = cbor2.CBORDecoder(fp).decode()
        except Exception as e:
            raise ValueError(f"bad CBOR body: {e}") from None
        if fp.tell() != len(body):  # one data item, as JSON's "Extra data" is refused
            raise ValueError(f"bad CBOR body: {len(body) - fp.tell()} bytes after the first data item")
        return value
    return body


def make_handler(q: Any, max_body: int, inflight: "Inflight") -> type:
    """The request handler class for a server writing to ``q``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every reply has a length
        server_version = "stagger-sqlite"
        timeout = 60  # seconds an idle keep-alive connection is kept

        def reply(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
            body = (json.dumps(payload) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self.reply(411, {"error": "a Content-Length header is required"})
            if int(length) > max_body:
                self.close_connection = True  # the body stays unread
                return self.reply(413, {"error": f"body of {length} bytes is over the limit of {max_body}"})
            body = self.rfile.read(int(length))
            try:
                msg = decode_body(self.headers.get("Content-Type", ""), body)
            except ValueError as e:
                return self.reply(400, {"error": str(e)})
            with inflight:
                try:
                    seq = q.write(msg)  # returns once durable (the queue's durability)
                except EncodeError as e:
                    return self.reply(415, {"error": str(e)})
                except LockTimeoutError as e:
                    return self.reply(503, {"error": str(e)}, {"Retry-After": 1})
                except StorageFullError as e:
                    return self.reply(507, {"error": str(e)})
                except QueueClosedError:
                    return self.reply(503, {"error": "shutting down"}, {"Retry-After": 1})
                except (StaggerError, OSError) as e:  # e.g. a file this process may only read
                    log.error("POST %s: the write failed: %s", self.path, e)
                    return self.reply(500, {"error": f"the write failed: {e}"})
            log.debug("POST %s: %d bytes -> seq=%d", self.path, len(body), seq)
            self.reply(200, {"seq": seq}, {SEQ_HEADER: seq})

        def not_allowed(self) -> None:
            self.close_connection = True
            self.reply(405, {"error": f"{self.command} is not supported: POST a message"}, {"Allow": "POST"})

        do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = not_allowed

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return Handler


class Inflight:
    """Counts writes in progress, so shutdown can let them finish first."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._n += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._n == 0, timeout)


def serve(
    path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    max_body: int = 1 << 20,
    codec: Any = "cbor",
    durability: str = "full",
    stop: Optional[threading.Event] = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set): each POST body is
    written to the queue at ``path``; the reply (sent once the write is
    durable) is ``{"seq": N}`` with a ``Stagger-Seq: N`` header.

    Replies: 200 written; 400 bad JSON/CBOR; 405 not a POST; 411 no
    Content-Length; 413 body over ``max_body``; 415 the queue's codec cannot
    store it; 503 (Retry-After) lock timeout or shutting down; 507 disk full.

    Raises:
        OSError: the address cannot be bound (e.g. the port is in use).
    """
    from .queue import StaggerQueue

    q = StaggerQueue(path, codec=codec, durability=durability)
    inflight = Inflight()
    try:
        try:
            server = ThreadingHTTPServer((host, port), make_handler(q, max_body, inflight))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
        stop = stop or threading.Event()
        restore = _on_signals(stop.set)
        thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
        thread.start()
        bound = server.server_address
        print(f"serving {path} on http://{bound[0]}:{bound[1]}/", file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.shutdown()
            server.server_close()
            inflight.drain(30.0)
            restore()
    finally:
        q.close()
    return 0


def _on_signals(fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn`` on SIGTERM/SIGINT (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.signal(s, lambda signum, frame: fn()) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in old.items()] and None


# -- forward -----------------------------------------------------------------

#: Deliveries before a retryable failure would dead-letter: never, in practice.
FOREVER = 2**62
#: Backoff between retries to a failing destination: from MIN, doubling, capped.
BACKOFF_MIN, BACKOFF_MAX = 0.1, 30.0
#: Seconds a forwarder's consumer waits for new messages before it looks at its flags.
POLL = 0.5


def encode_message(msg: Any) -> Tuple[bytes, str]:
    """The request body for a message: bytes as they are, JSON values as JSON,
    anything else (datetimes, sets ...) as CBOR."""
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return bytes(msg), "application/octet-stream"
    try:
        return json.dumps(msg, ensure_ascii=False, allow_nan=False).encode(), "application/json"
    except (TypeError, ValueError):
        return cbor2.dumps(msg), "application/cbor"


def retryable(status: int) -> bool:
    """5xx, 408 and 429 are retried forever; other 4xx dead-letter."""
    return status >= 500 or status in (408, 429)


class Destination:
    """One URL, one persistent connection (re-made after any failure).

    Raises (from ``post``):
        OSError, http.client.HTTPException: network failures (retryable).
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            raise ValueError(f"bad URL {url!r}: the port must be a number from 0 to 65535") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad URL {url!r}: use http://host[:port]/path or https://...")
        if not check_seconds("timeout", timeout, allow_none=False, positive=True) < math.inf:  # type: ignore[operator]
            raise ValueError("`timeout` must be a finite number of seconds, not inf")
        self.url = url
        self._scheme, self._netloc = parts.scheme, parts.netloc
        self._target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self._timeout = timeout
        self._conn: Optional[http.client.HTTPConnection] = None

    def post(self, seq: int, body: bytes, content_type: str) -> int:
        """POST one message; returns the status."""
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._netloc, timeout=self._timeout)
        try:
            self._conn.request(
                "POST", self._target, body=body,
                headers={"Content-Type": content_type, SEQ_HEADER: str(seq), "User-Agent": "stagger-sqlite"},
            )
            resp = self._conn.getresponse()
            resp.read()  # drain, so the connection can be reused
            if resp.will_close:
                self.close()
            return resp.status
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def group_for(url: str) -> str:
    """The consumer group that tracks deliveries to ``url``."""
    return f"forward:{url}"


class Forwarder:
    """Delivers every message of the queue to one URL, in its own group."""

    def __init__(self, q: Any, url: str, *, timeout: float, lease: float, stop: threading.Event) -> None:
        self.q = q
        self.dest = Destination(url, timeout)
        self.group = group_for(url)
        self.lease = lease
        self.stop = stop
        self.backoff = BACKOFF_MIN
        #: Why this destination cannot be served at all (the queue cannot be
        #: written here): ``forward`` stops and raises it.
        self.error: Optional[BaseException] = None

    def _member(self) -> Any:
        """The group member, made once; a lock timeout or a full disk is
        waited out (with backoff), anything else stops the whole command."""
        while not self.stop.is_set():
            try:
                return self.q.consume(group=self.group, batch=10, lease=self.lease, max_attempts=FOREVER, wait=POLL)
            except QueueClosedError:
                return None
            except (LockTimeoutError, StorageFullError) as e:
                log.warning("%s: cannot start (%s); retrying in %.1f s", self.dest.url, e, self.backoff)
                self.stop.wait(self.backoff)
                self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            except Exception as e:  # read-only file, ...: no retry mends it
                self.error = e
                self.stop.set()
                return None
        return None

    def run(self) -> None:
        # One member for the thread's life: a new one per round would create
        # the group again if it was dropped (``drop-group``) in between.
        c = self._member()
        if c is None:
            self.dest.close()
            return
        self.backoff = BACKOFF_MIN
        try:
            with c:
                while not self.stop.is_set() and not c.dropped:
                    try:
                        failed = self._round(c)
                    except QueueClosedError:
                        return
                    except Exception:  # e.g. a lock timeout: keep this destination alive
                        log.exception("%s: forwarding failed; retrying", self.dest.url)
                        failed = True
                    if failed:
                        self.stop.wait(self.backoff * random.uniform(0.5, 1.0))
                        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
                if c.dropped:
                    log.warning("%s: group %s was dropped; no longer forwarding there", self.dest.url, self.group)
        finally:
            self.dest.close()

    def _round(self, c: Any) -> bool:
        """Deliver until idle (POLL seconds), stopping, or a retryable failure
        (returns True: back off; the failed message was nacked)."""
        for seq, msg in c:
            body, kind = encode_message(msg)
            started = time.monotonic()
            try:
                status = self.dest.post(seq, body, kind)
            except (OSError, http.client.HTTPException) as e:
                status, error = 0, f"{type(e).__name__}: {e}"
            else:
                error = f"HTTP {status}"
            ms = (time.monotonic() - started) * 1000
            if 200 <= status < 300:
                self.backoff = BACKOFF_MIN
                log.debug("%s: seq=%d delivered in %.1f ms", self.dest.url, seq, ms)
            elif status == 0 or retryable(status):
                log.warning("%s: seq=%d failed (%s); retrying in %.1f s", self.dest.url, seq, error, self.backoff)
                c.nack(seq, delay=self.backoff, error=error)
                return True
            else:
                log.warning("%s: seq=%d refused (%s): dead letter", self.dest.url, seq, error)
                dead_letter(c, seq, error)
            if self.stop.is_set():
                break
        return False


def dead_letter(c: Any, seq: int, error: str) -> None:
    """Move the message in hand to the group's dead letters now."""
    c.nack(seq, error=error, dead=True)


def forward(
    path: str,
    urls: List[str],
    *,
    codec: Any = "cbor",
    timeout: float = 10.0,
    lease: float = 60.0,
    stop: Optional[threading.Event] = None,
) -> int:
    """POST every message of the queue at ``path`` to each URL until
    SIGTERM/SIGINT (or ``stop``), one thread and one group per URL.

    Raises:
        ValueError: a malformed URL, a timeout or lease that is not positive.
        FileNotFoundError: there is no queue at ``path`` (forwarding creates none).
        PermissionError, StaggerError: a destination could not start (e.g.
            the queue file is read-only here); every destination stops.
    """
    from .queue import StaggerQueue

    if len(set(urls)) != len(urls):
        raise ValueError("the same --url is given twice")
    for url in urls:
        Destination(url, timeout)  # validate all before starting any
    check_seconds("lease", lease, allow_none=False, positive=True)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no queue to forward from", path)
    stop = stop or threading.Event()
    with StaggerQueue(path, codec=codec) as q:
        forwarders = [Forwarder(q, url, timeout=timeout, lease=lease, stop=stop) for url in urls]
        threads = [threading.Thread(target=f.run, name=f"forward {f.dest.url}", daemon=True) for f in forwarders]
        restore = _on_signals(stop.set)
        try:
            for t in threads:
                t.start()
            print(f"forwarding {path} to {', '.join(urls)}", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
            for t in threads:
                t.join(timeout + 5)
        finally:
            restore()
    for f in forwarders:
        if f.error is not None:
            raise f.error
    return 0
