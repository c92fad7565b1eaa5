"""stagger_sqlite: durable, multi-process message queues, each one SQLite file.

Layers, each using only those below it:
cli -> workers, http -> groups, consume -> queue -> storage -> schema, lock,
codec, wakeup. Every module may import errors.
"""

from .consume import Consumer
from .errors import (
    AckOutOfRangeError,
    DecodeError,
    EncodeError,
    LockTimeoutError,
    NotAQueueError,
    QueueClosedError,
    StaggerError,
    StorageFullError,
)
from .groups import DeadLetter, GroupConsumer, GroupInfo
from .queue import StaggerQueue
from .workers import WorkerPool

# SPEC §3 types every `consume(...)` result as a Consumer: a group member is
# one too (a virtual subclass; it shares no code with the plain consumer).
Consumer.register(GroupConsumer)

__version__ = "0.1.0"

__all__ = [
    "StaggerQueue",
    "Consumer",
    "GroupInfo",
    "WorkerPool",
    "DeadLetter",
    "StaggerError",
    "QueueClosedError",
    "LockTimeoutError",
    "EncodeError",
    "DecodeError",
    "AckOutOfRangeError",
    "NotAQueueError",
    "StorageFullError",
]
