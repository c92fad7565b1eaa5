"""Power loss, simulated, two ways.

1. ``tests/powercut.py``: a writer runs on a VFS that models the disk (what
   was fsynced, plus any subset of what was written since, the last piece
   torn at any byte) and saves images of what a power cut could leave, in the
   middle of commits, checkpoints and WAL restarts, and right after writes
   returned. Every image must open, hold a prefix of the history made of
   whole ``write``/``write_many`` calls (no partial message, no partial
   batch), pass ``PRAGMA integrity_check`` and keep working (the next write
   gets ``last_seq + 1``).

   - ``durability="full"``: every write that returned before the cut is in
     the image, and so is every message a consumer (a thread reading all
     along) had been handed, even one whose write had not returned yet: no
     seqno a reader saw is handed out again.
   - ``durability="normal"``: writes that returned since the last checkpoint
     can be lost (the test shows they are), and their seqnos are handed out
     again to new messages after the reboot. A consumer that had read them
     must re-read from an earlier ack point.

2. Crash-consistent copies of a live multi-process queue: the writers are
   stopped with SIGSTOP (a process is stopped between system calls, so the
   files hold exactly what was written at that instant), the file and its
   WAL are copied, and the writers go on. Every copy holds every write that
   had returned. Each copy is then also opened with its WAL cut at random
   byte offsets (or its tail overwritten with junk) past the frames a
   checkpoint had already copied into the file (a real disk never loses
   those: the checkpoint fsyncs the WAL before copying them).
"""

import json
import os
import random
import shutil
import signal
import struct
import time

import apsw
import pytest

from stagger_sqlite import StaggerQueue
from tests.faults import check_payload, figure, kill9, read_logs, scaled, spawn, torture_seconds


def open_image(path):
    """Open a power-cut image; return (rows, last_seq) after checking that
    it passes integrity_check and keeps working."""
    with StaggerQueue(path) as q:
        rows = list(q.consume(0, wait=False, batch=500))
        last = q.last_seq
        conn = apsw.Connection(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
        finally:
            conn.close()
        assert not rows or last >= rows[-1][0]
        assert q.write({"id": "after-reboot"}) == last + 1
    return rows, last


@pytest.mark.parametrize("durability,purge_p", [("full", 0.0), ("normal", 0.0), ("full", 0.05)])
def test_power_cut_images(tmp_path, durability, purge_p):
    path = str(tmp_path / "q.db")
    StaggerQueue(path).close()
    images = tmp_path / "images"
    images.mkdir()
    seed = random.randrange(2**32)
    calls = scaled(1000, 5000) if purge_p else scaled(300, 3000)
    proc = spawn_powercut(path, str(images), durability, calls, seed, purge_p)
    assert proc.wait(300) == 0

    with open(images / "boundaries.json") as f:
        boundaries = set(json.load(f))
    lost_max = lost_images = delivered_ahead = 0
    checked = 0
    with open(images / "manifest.jsonl") as f:
        manifest = [json.loads(line) for line in f]
    for entry in manifest:
        rows, last = open_image(os.path.join(entry["image"], "q.db"))
        # A prefix of the history, whole messages and whole batches only
        # (less what a purge removed: never more than it was asked to).
        first = rows[0][0] if rows else 1
        k = rows[-1][0] if rows else entry["purge_intended"]
        assert [s for s, _ in rows] == list(range(first, k + 1)), entry
        for seq, msg in rows:
            assert check_payload(seq, msg) == f"w.{seq - 1}"
        assert k in boundaries, f"{entry}: {k} messages is not a whole number of write calls"
        assert first - 1 <= entry["purge_intended"], f"{entry}: more was purged than asked"
        assert first - 1 <= entry["purge_returned"] or first - 1 == entry["purge_intended"], entry
        lost = max(0, entry["returned"] - k)
        if durability == "full" and rows:
            assert first - 1 >= entry["purge_returned"], f"{entry}: a purge that returned was undone"
        if durability == "full":
            assert lost == 0, f"{entry}: a write that returned was lost with durability='full'"
            assert last >= entry["returned"]
            # Nor a message a consumer had been handed (its seqno would be
            # handed out again after the reboot, to a new message).
            assert k >= entry["delivered"], f"{entry}: a message a consumer had was lost with durability='full'"
        delivered_ahead = max(delivered_ahead, entry["delivered"] - entry["returned"])
        lost_max = max(lost_max, lost)
        lost_images += lost > 0
        checked += 1
    if durability == "normal":
        # What "normal" can lose, shown: writes that returned since the last
        # checkpoint (a cut keeping only what was fsynced loses them).
        assert lost_images > 0
    figure(
        f"power-cut images ({durability}{', with purges' if purge_p else ''})",
        seed=seed,
        write_calls=calls,
        images_checked=checked,
        images_losing_returned_writes=lost_images,
        most_returned_messages_lost=lost_max,
        consumer_ahead_of_returned_writes=delivered_ahead,
        file_truncations=json.load(open(images / "truncations.json")),
    )
    assert checked >= 5


def spawn_powercut(path, outdir, durability, calls, seed, purge_p):
    import subprocess
    import sys

    from tests.faults import ROOT

    code = (
        "from tests.powercut import writer; "
        f"writer({path!r}, {outdir!r}, {durability!r}, {calls}, {seed}, 0.02, {purge_p})"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


# -- crash-consistent copies of a live queue --------------------------------

WAL_HEADER = 32
FRAME_HEADER = 24


def backfilled_bytes(shm_path, page_size):
    """WAL bytes a checkpoint may already have copied into the database file.

    That is ``nBackfillAttempted`` of the wal-index (offset 128, native byte
    order), not ``nBackfill`` (offset 96): a checkpoint caught mid-way (its
    process stopped by SIGSTOP) has copied frames up to the attempted mark
    before it advances nBackfill. SQLite fsyncs the WAL before a checkpoint
    writes any of its frames to the database, so no power cut can lose a
    frame below that mark: cutting the WAL there would build an image that
    no real crash produces (the database file ahead of its WAL)."""
    with open(shm_path, "rb") as f:
        head = f.read(136)
    if len(head) < 136:
        return 0
    (n_backfill,) = struct.unpack("=I", head[96:100])
    (n_attempted,) = struct.unpack("=I", head[128:132])
    frames = max(n_backfill, n_attempted)
    return WAL_HEADER + frames * (FRAME_HEADER + page_size) if frames else 0


def test_sigstop_copies_and_torn_wals(tmp_path):
    path = str(tmp_path / "q.db")
    StaggerQueue(path).close()
    with StaggerQueue(path) as q:
        page_size = q._storage.read(lambda c: c.execute("PRAGMA page_size").fetchall()[0][0])
    rnd = random.Random()
    seed = rnd.randrange(2**32)
    rnd.seed(seed)
    logs = [str(tmp_path / f"p{i}.log") for i in range(3)]
    modes = ["write", "write_many", "write"]
    procs = [spawn("producer", path, logs[i], f"p{i}", modes[i], rnd.randrange(2**32)) for i in range(3)]
    copies = []
    duration = torture_seconds(4.0)
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.5, 1.5) * duration / 10)  # about 10 copies per run
            for p in procs:
                os.kill(p.pid, signal.SIGSTOP)
            try:
                returned = read_logs(logs).returned
                out = tmp_path / f"copy{len(copies):03d}"
                out.mkdir()
                # The WAL first, then the file: with the writers stopped the
                # order does not matter, but it is the safe order anyway.
                for suffix in ("-wal", ""):
                    if os.path.exists(path + suffix):
                        shutil.copyfile(path + suffix, str(out / ("q.db" + suffix)))
                floor = backfilled_bytes(path + "-shm", page_size) if os.path.exists(path + "-shm") else 0
            finally:
                for p in procs:
                    os.kill(p.pid, signal.SIGCONT)
            copies.append((out, returned, floor))
    finally:
        for p in procs:
            kill9(p)

    ever_returned = read_logs(logs).returned
    final = {}
    with StaggerQueue(path) as q:
        for seq, msg in q.consume(0, wait=False, batch=1000):
            final[seq] = msg["id"]
    cuts = 0
    for out, returned, floor in copies:
        variants = [("as-copied", None)]
        wal = out / "q.db-wal"
        size = os.path.getsize(wal) if wal.exists() else 0
        for _ in range(scaled(2, 5)):
            if size > floor:
                variants.append(("cut", rnd.randint(floor, size)))
                variants.append(("junk", rnd.randint(max(floor, WAL_HEADER), size)))
        for how, offset in variants:
            work = out.parent / (out.name + "-work")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(out, work)
            if how == "cut":
                os.truncate(work / "q.db-wal", offset)
            elif how == "junk":
                with open(work / "q.db-wal", "r+b") as f:
                    f.seek(offset)
                    f.write(os.urandom(max(0, size - offset)))
            rows, last = open_image(str(work / "q.db"))
            seqs = [s for s, _ in rows]
            # A prefix of the final history: the same messages at the same seqnos.
            assert seqs == sorted(final)[: len(seqs)], f"{out} {how}@{offset}: not a prefix"
            # Each row is the final history's message at that seqno, except
            # possibly a tail written by a call that never returned: a copy
            # taken while a writer had written its commit frame but not yet
            # published it in the wal-index counts that transaction as
            # committed (as a power cut there would), while in the live file
            # that writer was then killed and its seqnos went to others. Both
            # are allowed for a write that never returned.
            differ = [(seq, check_payload(seq, msg)) for seq, msg in rows if check_payload(seq, msg) != final[seq]]
            for seq, pid in differ:
                assert pid not in ever_returned, f"{out} {how}: seq {seq} holds {pid}, a returned write stored elsewhere"
            if differ:
                assert [s for s, _ in differ] == seqs[-len(differ):], f"{out} {how}: differences not confined to the tail"
            if how == "as-copied":
                got = {msg["id"] for _, msg in rows}
                missing = [pid for pid in returned if pid not in got]
                assert not missing, f"{out}: writes that returned are missing: {missing[:3]}"
            else:
                cuts += 1
    figure(
        "crash-consistent copies",
        seed=seed,
        seconds=duration,
        copies_checked=len(copies),
        torn_wal_variants_checked=cuts,
        messages_at_end=len(final),
        lost=0,
    )
    assert copies
