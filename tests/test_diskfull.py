"""Full disk: writes fail with StorageFullError, nothing partial is stored,
readers keep working, and writes succeed again once space is freed.

Two limits:
- a real small filesystem: a tmpfs mounted for the test (needs root and
  mount(2), which this suite's CI has; elsewhere the test is skipped and says
  why);
- SQLite's ``PRAGMA max_page_count`` on the queue's own connection, which
  needs nothing and runs everywhere.
"""

import os
import subprocess
import sys
import uuid

import apsw
import pytest

from stagger_sqlite import StaggerQueue, StorageFullError
from tests.faults import ROOT, figure


def integrity(path):
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def fill_until_full(q, rnd_size=3000):
    """Write until StorageFullError; return (seqs written, the error)."""
    written = []
    n = 0
    while True:
        try:
            if n % 3 == 2:
                written += q.write_many([{"n": n, "i": i, "pad": os.urandom(rnd_size)} for i in range(5)])
            else:
                written.append(q.write({"n": n, "pad": os.urandom(rnd_size)}))
        except StorageFullError as e:
            return written, e
        n += 1
        assert n < 100_000, "never got full"


def check_full_behaviour(q, path, written):
    """After a StorageFullError: nothing partial, readers fine, still full."""
    last, stored = q.last_seq, len(q)
    assert last == written[-1] and stored == len(written)
    for attempt in (lambda: q.write({"pad": os.urandom(50_000)}), lambda: q.write_many([{"pad": os.urandom(9000)}] * 20)):
        with pytest.raises(StorageFullError, match=str(path)):
            attempt()
        assert q.last_seq == last and len(q) == stored, "a failed write stored something"
    rows = list(q.consume(0, wait=False))
    assert [s for s, _ in rows] == written
    # Another process can still open and read the queue.
    code = f"from stagger_sqlite import StaggerQueue; q = StaggerQueue({path!r}); print(len(list(q.consume(0, wait=False))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(written)
    assert integrity(path) == [("ok",)]


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); test_page_limit_full covers the same contract")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_small_filesystem_full(small_fs):
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 600_000)
    path = str(small_fs / "q.db")
    with StaggerQueue(path) as q:
        written, err = fill_until_full(q)
        assert written, "the disk was full before the first write"
        assert "nothing of this write was stored" in str(err)
        check_full_behaviour(q, path, written)
        # Free space: writes work again, seqnos go on.
        filler.unlink()
        seq = q.write({"after": "space freed"})
        assert seq == written[-1] + 1
        assert q.write_many([{"x": i} for i in range(3)]) == [seq + 1, seq + 2, seq + 3]
        # On a disk that is completely full, purge itself needs a few pages of
        # WAL: it may fail too, cleanly, and works once space is freed.
        (small_fs / "filler2").write_bytes(b"\0" * 300_000)
        written2, _ = fill_until_full(q)
        try:
            q.purge(written2[len(written2) // 2])
        except StorageFullError:
            (small_fs / "filler2").unlink()
            q.purge(written2[len(written2) // 2])
        assert q.write({"after": "purge"}) == written2[-1] + 1
    assert integrity(path) == [("ok",)]
    figure("full disk (tmpfs 2 MB)", messages_before_full=len(written), lost=0)


def test_page_limit_full(qpath):
    with StaggerQueue(qpath) as q:
        pages = q._storage.read(lambda c: c.execute("PRAGMA page_count").fetchall()[0][0])

        def limit(n):
            q._storage.read(lambda c: c.execute(f"PRAGMA max_page_count = {n}").fetchall())

        limit(pages + 40)
        written, err = fill_until_full(q)
        assert written
        check_full_behaviour(q, qpath, written)
        # Free space by purging: the freed pages are reused.
        q.purge(written[len(written) // 2])
        seq = q.write({"after": "purge"})
        assert seq == written[-1] + 1
        # Or by raising the limit.
        limit(pages + 1000)
        assert q.write_many([{"i": i, "pad": os.urandom(3000)} for i in range(20)])[0] == seq + 1
    assert integrity(qpath) == [("ok",)]


def test_lock_file_on_full_disk_does_not_fail_a_commit(small_fs):
    """The post-commit ring of the lock file must not turn a committed write
    into an error when the disk is full."""
    path = str(small_fs / "q.db")
    with StaggerQueue(path) as q:
        q.write({"first": 1})
        written, _ = fill_until_full(q, rnd_size=200)
        assert q.last_seq == written[-1]


def test_group_member_on_a_full_disk(small_fs):
    """A group member needs to write (claims, acks): on a full disk it gets
    StorageFullError, loses nothing, and goes on once space is freed."""
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 600_000)
    path = str(small_fs / "q.db")
    with StaggerQueue(path) as q:
        written, _ = fill_until_full(q)
        got = []
        try:
            with q.consume(group="g", wait=False, batch=10) as c:
                for seq, _ in c:
                    got.append(seq)
        except StorageFullError as e:
            assert path in str(e)
            full_hit = True
        else:
            full_hit = False
        first_pass = len(got)
        filler.unlink()
        with q.consume(group="g", wait=False, batch=10) as c:
            for seq, _ in c:
                got.append(seq)
        assert sorted(set(got)) == written
        info = q.groups()["g"]
        assert info.acked == written[-1] and info.in_flight == 0
    assert integrity(path) == [("ok",)]
    figure("group member on a full disk", storage_full_raised=full_hit, handed_out_while_full=first_pass, lost=0)


def test_a_wal_fill_that_hits_a_full_disk_is_undone(small_fs, monkeypatch):
    """Full mode gives the WAL its working size (4 MiB of zeros) before the
    first commit, but only on a file system with room to spare. Made to try
    on this 2 MB one, the fill fails: the WAL is cut back to its size before
    the fill, and the write goes on."""
    from stagger_sqlite import durable

    monkeypatch.setattr(durable, "PREALLOCATE_MIN_FREE", 0)
    path = str(small_fs / "q.db")
    with StaggerQueue(path, durability="normal") as q:
        q.write({"first": 1})
    before = os.path.getsize(path + "-wal")
    with StaggerQueue(path) as q:
        assert q.write({"second": 2}) == 2
        assert os.path.getsize(path + "-wal") < 1024 * 1024, "the fill was undone"
        assert [m for _, m in q.consume(0, wait=False)] == [{"first": 1}, {"second": 2}]
    assert before <= os.path.getsize(path + "-wal")
    assert integrity(path) == [("ok",)]


def test_a_worker_pool_waits_out_a_full_disk_and_goes_on(small_fs, tmp_path, monkeypatch):
    """Workers need to write (claims, acks). On a full disk a worker logs
    and retries its claim with backoff, rather than dying and being
    restarted (which reran finished messages); once space is freed the
    pool finishes everything, each message once, in the same process."""
    from tests.helpers import wait_for
    from tests.test_workers import records

    out = str(tmp_path / "handled.txt")
    monkeypatch.setenv("STAGGER_TEST_OUT", out)
    path = str(small_fs / "q.db")
    with StaggerQueue(path, durability="normal") as q:
        q.write_many(range(1, 61))
        q.consume(group="g").close()
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "stagger_sqlite", "work", path, "--group", "g",
                              "--handler", "tests.test_workers:record", "--processes", "1", "--until-idle", "1"],
                             cwd=ROOT, stderr=err, text=True)
        try:
            wait_for(lambda: "retrying in" in err_path.read_text(), 60, message="a claim refused by the full disk")
            filler.unlink()
            assert p.wait(120) == 0
        finally:
            if p.poll() is None:
                p.kill()
    stderr = err_path.read_text()
    assert "Traceback" not in stderr and "restart" not in stderr.lower(), stderr
    handled = records(out)
    assert sorted(int(m) for m, _, _ in handled) == list(range(1, 61))  # each once
    assert len({pid for _, pid, _ in handled}) == 1  # no worker died on it
    with StaggerQueue(path) as q:
        info = q.groups()["g"]
    assert (info.acked, info.in_flight) == (60, 0)
