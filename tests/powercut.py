"""A power-loss simulator: a SQLite VFS that remembers what reached the disk.

A power cut keeps what was fsynced and, of what was written since the last
fsync of a file, any subset, the last piece possibly torn at any byte. This
VFS (the default one, in a writer process of its own) passes every operation
to the real unix VFS and keeps, per file, a model of the disk: the bytes as of
the last ``xSync`` plus the writes and truncations since. At random moments
(before any write, sync or truncate, i.e. in the middle of a commit or a
checkpoint, and right after a write call returned) it saves an *image*: what
the disk could hold if the power went off at that instant. ``-shm`` is
shared memory, not disk: an image never has one, as after a reboot.

The writer logs, per image, how many messages had been returned by ``write``
/ ``write_many`` when it was taken, and the highest seqno a consumer (a
thread reading all along through a queue object of its own) had been handed.
``tests/test_powerloss.py`` then opens every image.

With ``durability="full"`` the library fsyncs the WAL itself after a commit
(``os.fdatasync``, stagger_sqlite/durable.py), not through the VFS: the
writer process models those calls on the disk too.
"""

from __future__ import annotations

import json
import os
import random
import threading
from typing import Dict, List, Optional, Tuple

import apsw

Op = Tuple[str, int, bytes]  # ("W", offset, data) | ("T", size, b"")


class Disk:
    """The modelled disk: durable bytes and pending operations per file."""

    def __init__(self, outdir: str, rnd: random.Random, cut_p: float) -> None:
        self.outdir = outdir
        self.rnd = rnd
        self.cut_p = cut_p
        self.durable: Dict[str, bytearray] = {}
        self.pending: Dict[str, List[Op]] = {}
        self.armed = False
        self.returned = 0  # messages whose write call returned
        self.purge_intended = 0  # highest bound a purge was called with
        self.purge_returned = 0  # highest bound of a purge that returned
        self.boundaries = [0]  # message counts at which a call's commit ended
        self.images = 0
        self.truncations: Dict[str, int] = {}  # file -> xTruncate calls
        self.delivered = 0  # highest seqno a consumer was handed
        # The writer and the consumer (its fsyncs) both reach the model.
        self.mutex = threading.RLock()

    def track(self, name: str) -> None:
        if name not in self.durable:
            try:
                with open(name, "rb") as f:
                    self.durable[name] = bytearray(f.read())
            except FileNotFoundError:
                self.durable[name] = bytearray()
            self.pending[name] = []

    def op(self, name: str, op: Optional[Op]) -> None:
        """Called before each operation (``None``: a sync)."""
        with self.mutex:
            self._op(name, op)

    def _op(self, name: str, op: Optional[Op]) -> None:
        if self.armed and self.rnd.random() < self.cut_p:
            self.cut("during")
        if op is None:
            for o in self.pending[name]:
                apply(self.durable[name], o)
            self.pending[name] = []
        else:
            self.pending[name].append(op)
            if op[0] == "T":
                self.truncations[os.path.basename(name)] = self.truncations.get(os.path.basename(name), 0) + 1

    def cut(self, when: str) -> None:
        """Save one image of what the disk could hold if the power went now."""
        with self.mutex:
            self._cut(when)

    def _cut(self, when: str) -> None:
        how = self.rnd.choice(["synced-only", "everything", "prefix-torn", "subset-torn"])
        out = os.path.join(self.outdir, f"image{self.images:04d}")
        os.makedirs(out)
        for name, data in self.durable.items():
            image = bytearray(data)
            ops = self.pending[name]
            if how == "everything":
                keep = list(ops)
            elif how == "prefix-torn":
                keep = ops[: self.rnd.randint(0, len(ops))]
            elif how == "subset-torn":
                keep = [o for o in ops if self.rnd.random() < 0.5]
            else:
                keep = []
            for i, o in enumerate(keep):
                if how != "everything" and i == len(keep) - 1 and o[0] == "W" and self.rnd.random() < 0.7:
                    o = ("W", o[1], o[2][: self.rnd.randint(0, len(o[2]))])  # torn at a random byte
                apply(image, o)
            with open(os.path.join(out, os.path.basename(name)), "wb") as f:
                f.write(image)
        with open(os.path.join(self.outdir, "manifest.jsonl"), "a") as f:
            f.write(
                json.dumps(
                    {
                        "image": out,
                        "returned": self.returned,
                        "delivered": self.delivered,
                        "purge_intended": self.purge_intended,
                        "purge_returned": self.purge_returned,
                        "when": when,
                        "how": how,
                    }
                )
                + "\n"
            )
        self.images += 1


def apply(image: bytearray, op: Op) -> None:
    kind, at, data = op
    if kind == "T":
        del image[at:]
        return
    if len(image) < at:
        image.extend(b"\0" * (at - len(image)))
    image[at : at + len(data)] = data


class RecordingFile(apsw.VFSFile):
    def __init__(self, disk: Disk, name: object, flags: List[int]) -> None:
        self.disk = disk
        self.name = name.filename() if isinstance(name, apsw.URIFilename) else name
        # Only the queue file and its WAL are disk state worth modelling.
        self.tracked = isinstance(self.name, str) and self.name.endswith((".db", ".db-wal"))
        if self.tracked:
            disk.track(self.name)
        super().__init__("unix", name, flags)

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.tracked:
            self.disk.op(self.name, ("W", offset, bytes(data)))
        super().xWrite(data, offset)

    def xTruncate(self, size: int) -> None:
        if self.tracked:
            self.disk.op(self.name, ("T", size, b""))
        super().xTruncate(size)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
        if self.tracked:
            self.disk.op(self.name, None)


class RecordingVFS(apsw.VFS):
    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        super().__init__("powercut", "unix", makedefault=True)

    def xOpen(self, name: object, flags: List[int]) -> apsw.VFSFile:
        return RecordingFile(self.disk, name, flags)


def model_fsyncs(disk: Disk) -> None:
    """Make the process's own ``os.fdatasync``/``os.fsync`` of a modelled
    file a sync on the model too (after the real one, like ``xSync``)."""
    for fname in ("fdatasync", "fsync"):
        real = getattr(os, fname)

        def synced(fd: int, _real=real) -> None:
            _real(fd)
            name = os.readlink(f"/proc/self/fd/{fd}")
            for tracked in list(disk.durable):
                if os.path.realpath(tracked) == name:
                    disk.op(tracked, None)

        setattr(os, fname, synced)


def consumer(path: str, durability: str, disk: Disk, stop: threading.Event) -> None:
    """Read all along, as fast as it can, through a queue object of its own
    (so it knows only what the lock file's published horizon or its own
    fsyncs tell it), and note the highest seqno it was handed."""
    from stagger_sqlite import StaggerQueue

    with StaggerQueue(path, durability=durability, timeout=None) as q:
        ack = 0
        while not stop.is_set():
            for seq, _msg in q.consume(ack, wait=False, batch=4):
                ack = seq
                disk.delivered = seq


def writer(path: str, outdir: str, durability: str, calls: int, seed: int, cut_p: float, purge_p: float = 0.0) -> None:
    """Write ``calls`` times (write or write_many of 1-8), messages ``w.0``,
    ``w.1``..., saving power-cut images along the way; after a call, with
    probability ``purge_p``, purge all but the last ~40 messages (which frees
    pages and, past a threshold, truncates the file: incremental vacuum)."""
    from stagger_sqlite import StaggerQueue
    from tests.faults import payload

    rnd = random.Random(seed)
    disk = Disk(outdir, rnd, cut_p)
    vfs = RecordingVFS(disk)  # noqa: F841 - registered while referenced
    model_fsyncs(disk)
    q = StaggerQueue(path, durability=durability, timeout=None)
    # Checkpoint every few pages instead of every 1000, so that cuts land in
    # checkpoints and WAL restarts too, not only in appends.
    q._storage.read(lambda conn: conn.execute("PRAGMA wal_autocheckpoint = 16").fetchall())
    disk.armed = True
    stop = threading.Event()
    reader = threading.Thread(target=consumer, args=(path, durability, disk, stop))
    reader.start()
    n = 0
    for _ in range(calls):
        k = rnd.choice([1, 1, 1, 2, 8])
        ids = [f"w.{n + i}" for i in range(k)]
        if k == 1:
            seqs = [q.write(payload(ids[0]))]
        else:
            seqs = q.write_many([payload(i) for i in ids])
        assert seqs == list(range(n + 1, n + k + 1)), seqs
        n += k
        disk.returned = n
        disk.boundaries.append(n)
        if rnd.random() < cut_p * 4:
            disk.cut("after-return")
        if rnd.random() < purge_p and n > 40:
            disk.purge_intended = n - 40
            q.purge(n - 40)
            disk.purge_returned = n - 40
    stop.set()
    reader.join()
    disk.armed = False
    with open(os.path.join(outdir, "boundaries.json"), "w") as f:
        json.dump(disk.boundaries, f)
    with open(os.path.join(outdir, "truncations.json"), "w") as f:
        json.dump(disk.truncations, f)
    q.close()
