"""The ``stagger-sqlite`` command line: each command is a thin call of the library.

User mistakes (a missing file, bad JSON, a bad handler, a port in use, a bad
rate) end as one line on stderr and exit status 1; argparse usage errors
exit 2. Only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import decimal
import json
import logging
import math
import os
import sys
import time
import uuid
from typing import Any, Callable, Iterator, List, NoReturn, Optional

from . import __version__, control
from .errors import StaggerError

PROG = "stagger-sqlite"


class UserError(Exception):
    """A mistake to report in one line (exit status 1)."""


# -- rendering --------------------------------------------------------------


def to_json(value: Any) -> Any:
    """``json.dumps(default=...)`` for values JSON lacks: bytes as
    ``{"$bytes": base64}``, datetimes and dates as ISO 8601, Decimal and UUID
    as strings, sets as lists, CBOR tags as ``{"$tag": n, "value": ...}``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    tag = getattr(value, "tag", None)
    if tag is not None and hasattr(value, "value"):
        return {"$tag": tag, "value": value.value}
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return repr(value)


def dumps(value: Any) -> str:
    """One line of strict JSON for any message, ``to_json`` for the types
    JSON lacks; a message JSON cannot hold as it is (a map with keys other
    than strings and integers, a NaN or an infinity) goes through
    ``_jsonable`` instead."""
    try:
        return json.dumps(value, default=to_json, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(value), default=to_json, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


_JSON_KEYS = (str, int, bool, type(None))


def _jsonable(value: Any) -> Any:
    """``value`` with what strict JSON cannot hold spelled out: a map whose
    keys are not all strings or integers as ``{"$map": [[key, value], ...]}``,
    a NaN or an infinity as ``{"$float": "nan" | "inf" | "-inf"}``; other
    types JSON lacks through ``to_json``, whose results are spelled out too."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, (str, int, float, type(None))):
        return value
    if isinstance(value, dict):
        if all(isinstance(k, _JSON_KEYS) for k in value):
            return {k: _jsonable(v) for k, v in value.items()}
        return {"$map": [[_jsonable(k), _jsonable(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _jsonable(to_json(value))


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")


# -- opening ------------------------------------------------------------------


def open_queue(path: str, codec: str = "cbor", *, create: bool = False, **kw: Any):
    """The queue at ``path``; a missing file is a user error unless ``create``."""
    from .queue import StaggerQueue

    if not create and not os.path.exists(path):
        raise UserError(f"{path}: no such queue file")
    return StaggerQueue(path, codec=codec, **kw)


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: bad JSON ({e}): {text[:60]!r}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read: {text[:60]!r}") from None


# -- commands -----------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    with open_queue(args.path) as q:
        stats = q.stats()
    if args.json:
        emit(dumps(stats))
        return 0
    emit(f"queue     {args.path}")
    for key in ("last_seq", "stored", "scheduled", "bytes"):
        if key in stats:
            emit(f"{key:<9} {stats[key]}")
    groups = stats.get("groups", {})
    if groups:
        cols = ["acked", "lag", "in_flight", "retrying", "dead"]
        width = max(5, *(len(g) for g in groups))
        emit("")
        emit(f"{'group':<{width}} " + " ".join(f"{c:>9}" for c in cols))
        for name, g in sorted(groups.items()):
            row = " ".join(f"{g.get(c, ''):>9}" for c in cols)
            emit(f"{name:<{width}} {row}" + ("  (paused)" if g.get("paused") else ""))
    return 0


def _write_inputs(args: argparse.Namespace) -> Iterator[Any]:
    raw = args.codec == "raw"
    if args.messages:
        for i, text in enumerate(args.messages, 1):
            yield text.encode() if raw else parse_json(text, f"argument {i}")
        return
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        yield line.encode() if raw else parse_json(line, f"stdin line {n}")


def cmd_write(args: argparse.Namespace) -> int:
    chunk: List[Any] = []
    written = 0
    progress = not args.messages and sys.stderr.isatty()
    started = time.monotonic()
    with open_queue(args.path, args.codec, create=True, durability=args.durability) as q:

        def flush() -> None:
            nonlocal written
            seqs = q.write_many(chunk)
            written += len(seqs)
            if not args.quiet:
                sys.stdout.write("".join(f"{s}\n" for s in seqs))
            chunk.clear()
            if progress and written >= 10000:
                rate = written / max(time.monotonic() - started, 1e-9)
                sys.stderr.write(f"\rwritten {written}  ({rate:,.0f}/s)")
                sys.stderr.flush()

        try:
            for msg in _write_inputs(args):
                chunk.append(msg)
                if len(chunk) >= 1000:
                    flush()
        except UserError as e:
            raise UserError(f"{e}; {written} message(s) before it were written") if written else e
        if chunk:
            flush()
    if progress and written >= 10000:
        sys.stderr.write("\n")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    wait: Any = True if args.follow else False
    count = 0
    with open_queue(args.path, args.codec) as q:
        if args.group is not None:
            c = q.consume(group=args.group, ack=args.ack, batch=args.batch, wait=wait)
        else:
            c = q.consume(ack=args.ack, batch=args.batch, wait=wait)
        with c:
            for seq, msg in c:
                try:
                    emit(dumps({"seq": seq, "msg": msg}))
                    if args.follow or args.group is not None:
                        # With a group, the next message acks this one: it
                        # must have left this process first (at-least-once).
                        sys.stdout.flush()
                except BrokenPipeError:
                    if args.group is not None:
                        c.nack(seq, delay=0)  # not delivered: another member gets it
                    raise
                count += 1
                if args.limit and count >= args.limit:
                    break
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    with open_queue(args.path) as q:
        emit(str(q.purge(args.upto if args.upto is not None else args.upto_pos)))
    return 0


def _existing_group(q: Any, path: str, group: str) -> None:
    if group not in q.groups():
        raise UserError(f"{path}: no group {group!r}")


def cmd_dead(args: argparse.Namespace) -> int:
    with open_queue(args.path, args.codec) as q:
        _existing_group(q, args.path, args.group)
        for d in q.dead_letters(args.group):
            emit(dumps({"seq": d.seq, "attempts": d.attempts, "error": d.error, "msg": d.msg}))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    with open_queue(args.path) as q:
        _existing_group(q, args.path, args.group)
        emit(str(q.requeue(args.group, args.seq or None)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    with open_queue(args.path) as q:
        problems = check(q)
    for p in problems:
        print(f"{args.path}: {p}", file=sys.stderr)
    if problems:
        return 1
    emit(f"{args.path}: ok")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    with open_queue(args.path) as q:
        q.pause(args.group)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with open_queue(args.path) as q:
        q.resume(args.group)
    return 0


def cmd_drop_group(args: argparse.Namespace) -> int:
    with open_queue(args.path) as q:
        if not q.drop_group(args.group):
            raise UserError(f"{args.path}: no group {args.group!r}")
    return 0


def cmd_work(args: argparse.Namespace) -> int:
    from .workers import WorkerPool

    _logging(args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # handlers of the project at hand import
    pool = WorkerPool(
        args.path, args.group, args.handler, processes=args.processes, batch=args.batch,
        batch_handler=args.batch_handler, lease=args.lease, max_attempts=args.max_attempts,
        rate=args.rate, until_idle=args.until_idle, codec=args.codec,
    )
    open_queue(args.path, args.codec, create=True).close()  # a bad path fails here, once
    return pool.run()


def cmd_serve(args: argparse.Namespace) -> int:
    from .http import serve

    _logging(args)
    host, port = _bind(args.bind)
    return serve(args.path, host, port, max_body=args.max_body, codec=args.codec, durability=args.durability)


def cmd_forward(args: argparse.Namespace) -> int:
    from .http import forward

    _logging(args)
    return forward(args.path, args.url, codec=args.codec, timeout=args.timeout, lease=args.lease)


#: Seconds per measurement of ``bench --quick``.
QUICK_SECONDS = 0.5


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import quick

    return quick(seconds=QUICK_SECONDS if args.quick else args.seconds, directory=args.dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(
        path=args.path, messages=args.messages, producers=args.producers,
        processes=args.processes, kill=not args.no_kill,
    )


def _bind(text: str):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"bad --bind {text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host or "127.0.0.1", int(port)


def _logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose >= 2 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(levelname)s %(message)s")
    logging.getLogger("stagger_sqlite").setLevel(level)


# -- the parser ----------------------------------------------------------------


def _rate(text: str) -> control.Rate:
    try:
        return control.parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, not {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line (``--help`` has the rest)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Durable, multi-process message queues, each one a SQLite file.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str, example: str, path: bool = True):
        p = sub.add_parser(name, help=help, description=help, epilog=f"Example: {example}")
        p.set_defaults(func=fn)
        if path:
            p.add_argument("path", help="the queue file")
        return p

    def codec(p: argparse.ArgumentParser) -> None:
        p.add_argument("--codec", choices=["cbor", "json", "raw"], default="cbor", help="the queue's codec (default cbor)")

    def group(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--group", "-g", required=required, help="consumer group name")

    def verbose(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: every job, with its timing)")

    p = command("info", cmd_info, "show the queue's figures and its groups", f"{PROG} info jobs.db --json")
    p.add_argument("--json", action="store_true", help="print q.stats() as one JSON object")

    p = command("write", cmd_write, "write messages: JSON arguments, or JSON lines on stdin",
                f"{PROG} write jobs.db '{{\"order\": 17}}' '\"hello\"'")
    p.add_argument("messages", nargs="*", help="JSON values (none: read JSON lines from stdin)")
    p.add_argument("--durability", choices=["full", "normal"], default="full")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the seqnos")
    codec(p)

    p = command("read", cmd_read, "print messages as JSON lines {\"seq\": N, \"msg\": ...}",
                f"{PROG} read jobs.db --ack 10 --follow")
    p.add_argument("--ack", type=int, default=0, help="start after this seqno (for a new --group: its start)")
    group(p, required=False)
    p.add_argument("--follow", "-f", action="store_true", help="wait for new messages")
    p.add_argument("--limit", type=_positive_int, help="stop after this many messages")
    p.add_argument("--batch", type=_positive_int, default=50)
    codec(p)

    p = command("purge", cmd_purge, "remove stored messages every group has finished",
                f"{PROG} purge jobs.db --upto 1000")
    p.add_argument("upto_pos", nargs="?", type=int, metavar="UPTO", help="same as --upto")
    p.add_argument("--upto", type=int, help="remove seqnos <= this (default: all finished)")

    p = command("dead", cmd_dead, "print a group's dead letters as JSON lines", f"{PROG} dead jobs.db --group mailer")
    group(p)
    codec(p)

    p = command("requeue", cmd_requeue, "deliver a group's dead letters again",
                f"{PROG} requeue jobs.db --group mailer --seq 17")
    group(p)
    p.add_argument("--seq", type=int, action="append", help="only this seqno (repeatable; default: all)")

    command("check", cmd_check, "check the file's integrity and the queue's invariants", f"{PROG} check jobs.db")

    p = command("pause", cmd_pause, "stop hand-outs to every member of a group", f"{PROG} pause jobs.db --group mailer")
    group(p)
    p = command("resume", cmd_resume, "let the members of a paused group go on", f"{PROG} resume jobs.db --group mailer")
    group(p)
    p = command("drop-group", cmd_drop_group, "delete a group, its deliveries and dead letters (purge stops waiting for it)",
                f"{PROG} drop-group jobs.db --group old-mailer")
    group(p)

    p = command("work", cmd_work, "run a handler over a group in a pool of worker processes",
                f"{PROG} work jobs.db --group mailer --handler myapp.tasks:send --processes 4 --rate 100/s")
    group(p)
    p.add_argument("--handler", required=True, help="module:function, called with each message")
    p.add_argument("--processes", "-n", type=_positive_int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=_positive_int, default=50, help="messages claimed per round trip")
    p.add_argument("--batch-handler", action="store_true", help="call the handler with lists of up to --batch messages")
    p.add_argument("--lease", type=_positive_seconds, default=30.0, help="seconds before a held message is redelivered")
    p.add_argument("--max-attempts", type=_positive_int, default=5, help="deliveries before dead-lettering")
    p.add_argument("--rate", type=_rate, help="N/s, N/m or N/h for the whole group, across every process and pool")
    p.add_argument("--until-idle", type=_seconds, help="exit once the group was idle this many seconds")
    codec(p)
    verbose(p)

    p = command("serve", cmd_serve, "write every HTTP POST body to the queue; reply with its seqno",
                f"{PROG} serve jobs.db --bind 127.0.0.1:8080")
    p.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    p.add_argument("--max-body", type=_positive_int, default=1 << 20, help="largest body accepted, bytes (default 1 MiB)")
    p.add_argument("--durability", choices=["full", "normal"], default="full")
    codec(p)
    verbose(p)

    p = command("forward", cmd_forward, "POST every message to each URL (each URL its own group)",
                f"{PROG} forward jobs.db --url http://127.0.0.1:9000/hook")
    p.add_argument("--url", action="append", required=True, help="destination (repeatable)")
    p.add_argument("--timeout", type=_positive_seconds, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--lease", type=_positive_seconds, default=60.0, help="seconds before a held message is redelivered")
    codec(p)
    verbose(p)

    p = command("bench", cmd_bench, "a quick benchmark of this machine (beside the peers: tox -e bench)",
                f"{PROG} bench --quick", path=False)
    p.add_argument("--seconds", type=_seconds, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:g} s per measurement, a few seconds in all")
    p.add_argument("--dir", help="directory for the scratch queue files (default: a temp dir)")

    p = command("demo", cmd_demo, "producers and a worker pool on a local queue, with a live display",
                f"{PROG} demo --messages 20000", path=False)
    p.add_argument("--path", help="queue file (default: a new one in a temp dir)")
    p.add_argument("--messages", type=_positive_int, default=10000)
    p.add_argument("--producers", type=_positive_int, default=2)
    p.add_argument("--processes", type=_positive_int, default=2, help="worker processes")
    p.add_argument("--no-kill", action="store_true", help="do not SIGKILL a worker half-way through")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command ran (while parsing)
        return 130


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.command == "write" and extra and not any(e.startswith("-") for e in extra[:1]):
        args.messages += extra  # messages after an option: `write q.db -q 1 2`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UserError, StaggerError, ValueError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
