"""Opening a queue file (SPEC §1, §5): creation, refusals that leave the file
untouched, format versions, permission bits, read-only files."""

import contextlib
import hashlib
import os
import pickle
import shutil
import sqlite3
import stat
import tempfile

import pytest

from stagger_sqlite import NotAQueueError, StaggerQueue
from stagger_sqlite import schema

SIDE_FILES = ("-wal", "-shm", ".lock", "-journal")


def snapshot(path):
    """Hashes of every file in the directory of ``path`` (what must not change)."""
    d = os.path.dirname(path)
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mode)
        else:
            out[name] = "dir"
    return out


def assert_refused_untouched(path, match=None):
    before = snapshot(path)
    with pytest.raises(NotAQueueError, match=match) as e:
        StaggerQueue(path)
    assert snapshot(path) == before  # byte-for-byte, and no -wal/-shm/.lock created
    assert path in str(e.value)
    return e.value


def test_creates_a_missing_file_in_wal_mode(qpath):
    with StaggerQueue(qpath) as q:
        q.write(1)
    with open(qpath, "rb") as f:
        header = f.read(100)
    assert header.startswith(b"SQLite format 3\x00")
    assert header[18:20] == b"\x02\x02"  # WAL read/write versions
    assert os.path.exists(qpath + ".lock")
    assert not [n for n in os.listdir(os.path.dirname(qpath)) if ".tmp-" in n]  # no leftovers


def test_a_directory_is_not_a_queue(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    (d / "inside").write_text("x")
    assert_refused_untouched(str(d), match="directory")
    assert os.listdir(d) == ["inside"]


@pytest.mark.parametrize("size", [1, 99, 100, 4096, 100_000])
def test_random_bytes_are_not_a_queue(qpath, size):
    with open(qpath, "wb") as f:
        f.write(os.urandom(size))
    assert_refused_untouched(qpath, match="not a SQLite file")


def test_text_file_is_not_a_queue(qpath):
    with open(qpath, "w") as f:
        f.write("SQLite format 3 but really just text\n" * 10)
    assert_refused_untouched(qpath)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_foreign_sqlite_database_is_not_a_queue(qpath, journal):
    con = sqlite3.connect(qpath)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, body BLOB)")
    con.execute("INSERT INTO messages VALUES (1, x'00')")
    con.commit()
    con.close()
    assert_refused_untouched(qpath, match="another application")


def test_queue_identity_without_the_tables_is_not_a_queue(qpath):
    con = sqlite3.connect(qpath)
    con.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
    con.execute(f"PRAGMA user_version = {schema.FORMAT_VERSION}")
    con.execute("CREATE TABLE other (x)")
    con.commit()
    con.close()
    with pytest.raises(NotAQueueError, match="lacks tables"):
        StaggerQueue(qpath)
    con = sqlite3.connect(qpath)
    assert con.execute("SELECT name FROM sqlite_master").fetchall() == [("other",)]
    con.close()


def _make_queue_then_set_version(qpath, version):
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "b"])
    con = sqlite3.connect(qpath)  # last connection: folds the WAL into the file
    con.execute(f"PRAGMA user_version = {version}")
    con.commit()
    con.close()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qpath + suffix)


def test_a_newer_format_version_is_refused_untouched(qpath):
    _make_queue_then_set_version(qpath, schema.FORMAT_VERSION + 1)
    os.unlink(qpath + ".lock")
    err = assert_refused_untouched(qpath, match="version")
    assert "upgrade" in str(err)


def test_the_queue_identity_with_no_format_version_is_refused_untouched(qpath):
    _make_queue_then_set_version(qpath, 0)
    os.unlink(qpath + ".lock")
    assert_refused_untouched(qpath, match="no format version")


def test_a_symlink_to_the_queue_file_shares_its_lock_and_wal(tmp_path):
    # SQLite keeps -wal/-shm beside the file the link points to; the writer
    # lock (which other tools take) and the WAL fsynced in full mode follow.
    import filelock

    from stagger_sqlite import LockTimeoutError

    real, link = str(tmp_path / "real.db"), str(tmp_path / "link.db")
    StaggerQueue(real).close()
    os.symlink("real.db", link)
    with StaggerQueue(link, timeout=0.2) as q:
        assert q.path == real
        q.write("through the link")
        assert q._storage._horizon._wal_fd is not None  # the WAL it fsyncs is the live one
        with filelock.FileLock(real + ".lock"):
            with pytest.raises(LockTimeoutError):
                q.write("blocked by the real file's lock")
    assert not os.path.exists(link + ".lock") and os.path.islink(link)
    with StaggerQueue(real) as q:
        assert [m for _, m in q.consume(wait=False)] == ["through the link"]


def test_a_relative_path_keeps_naming_the_same_files_after_chdir(tmp_path, monkeypatch):
    # The lock file is opened at the first write and the connection again
    # after a fork: both must be the queue's, wherever the process moved.
    import filelock

    from stagger_sqlite import LockTimeoutError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with StaggerQueue("q.db", timeout=0.2) as q:
        monkeypatch.chdir(tmp_path / "b")
        with filelock.FileLock(str(tmp_path / "a" / "q.db.lock")):
            with pytest.raises(LockTimeoutError):
                q.write("blocked by the queue's own lock")
        assert q.write("one") == 1
        pid = os.fork()
        if pid == 0:  # the child reconnects: to a/q.db, not b/q.db
            try:
                os._exit(0 if q.write("from the child") == 2 else 1)
            except BaseException:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] == 0
        assert [m for _, m in q.consume(wait=False)] == ["one", "from the child"]
    assert os.listdir(tmp_path / "b") == []


def test_an_empty_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path"):
        StaggerQueue("")
    assert os.listdir(tmp_path) == []


def test_a_queue_dropped_without_close_leaves_no_descriptor_open(qpath):
    # `StaggerQueue(p).write(x)` in a loop must not run out of descriptors.
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    for durability in ("full", "normal"):  # the first round makes what lives on (the wake-up hub)
        q = StaggerQueue(qpath, durability=durability)
        q.write("x")
        list(q.consume(wait=False))
        list(q.consume(group="g", wait=False))
        q.close()
    before = open_fds()
    for i in range(30):
        q = StaggerQueue(qpath, durability=("full", "normal")[i % 2])
        q.write(i)
        list(q.consume(ack=i, wait=False))
        list(q.consume(group="g", wait=False))
        del q
    assert open_fds() == before


def test_a_newer_version_only_in_the_wal_is_refused(qpath):
    """The header on disk may be stale while the WAL holds a newer version."""
    with StaggerQueue(qpath) as q:
        q.write("a")
        q._storage.write(lambda c: c.execute(f"PRAGMA user_version = {schema.FORMAT_VERSION + 1}"))
    with pytest.raises(NotAQueueError, match="version"):
        StaggerQueue(qpath)


def test_an_older_format_version_is_migrated(qpath, monkeypatch):
    """Room for migrations: a file of version n-1 is brought to n on open."""
    with StaggerQueue(qpath) as q:
        q.write("kept")
    monkeypatch.setattr(schema, "FORMAT_VERSION", schema.FORMAT_VERSION + 1)
    monkeypatch.setitem(schema.MIGRATIONS, schema.FORMAT_VERSION, ["CREATE TABLE added_in_next (x)"])
    with StaggerQueue(qpath) as q:
        assert q._storage.read(schema.version_of) == schema.FORMAT_VERSION
        tables = q._storage.read(lambda c: c.execute("SELECT name FROM sqlite_master").fetchall())
        assert ("added_in_next",) in tables
        assert [m for _, m in q.consume(wait=False)] == ["kept"]
    monkeypatch.undo()
    with pytest.raises(NotAQueueError, match="version"):  # this release is now too old for it
        StaggerQueue(qpath)


def test_an_empty_file_becomes_a_queue(qpath):
    """An empty file is an empty SQLite database: it is made into a queue."""
    open(qpath, "wb").close()
    with StaggerQueue(qpath) as q:
        assert q.write(1) == 1


def test_a_missing_directory_is_file_not_found(tmp_path):
    path = str(tmp_path / "no" / "such" / "q.db")
    with pytest.raises(FileNotFoundError) as e:
        StaggerQueue(path)
    assert "no/such" in str(e.value)
    assert not (tmp_path / "no").exists()


def test_default_mode_is_owner_only(qpath):
    old = os.umask(0)
    try:
        with StaggerQueue(qpath) as q:
            q.write(1)
            for suffix in ("", ".lock", "-wal", "-shm"):
                assert stat.S_IMODE(os.stat(qpath + suffix).st_mode) == 0o600, suffix
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode, umask", [(0o640, 0o022), (0o664, 0o077), (0o660, 0o000)])
def test_custom_mode_applies_to_file_and_lock_whatever_the_umask(qpath, mode, umask):
    old = os.umask(umask)
    try:
        with StaggerQueue(qpath, mode=mode) as q:
            q.write(1)
            for suffix in ("", ".lock", "-wal", "-shm"):
                assert stat.S_IMODE(os.stat(qpath + suffix).st_mode) == mode, suffix
    finally:
        os.umask(old)


def test_mode_of_an_existing_file_is_left_alone(qpath):
    with StaggerQueue(qpath) as q:
        q.write(1)
    os.chmod(qpath, 0o644)
    with StaggerQueue(qpath, mode=0o600) as q:
        q.write(2)
    assert stat.S_IMODE(os.stat(qpath).st_mode) == 0o644


@pytest.mark.parametrize("bad", [-1, "0o600", 1.5, None, 0o100600])
def test_bad_mode_is_a_value_error(qpath, bad):
    with pytest.raises(ValueError, match="mode"):
        StaggerQueue(qpath, mode=bad)
    assert os.listdir(os.path.dirname(qpath)) == []


def test_two_opens_creating_the_same_file_at_once_end_with_one_queue(tmp_path):
    path = str(tmp_path / "race.db")
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with StaggerQueue(path) as q:
                    q.write(i)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with StaggerQueue(path) as q:
        assert sorted(m for _, m in q.consume(wait=False)) == [0, 1, 2, 3]


# -- read-only files and directories ------------------------------------


@pytest.fixture
def shared_dir():
    """A directory another user can enter (tmp_path's parents are owner-only)."""
    d = tempfile.mkdtemp(prefix="stagger-ro-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def without_write_access(paths, fn):
    """Run ``fn()`` unable to write ``paths`` and return its (picklable) result.

    As root, permission bits do not bind: a forked child drops to ``nobody``.
    Otherwise the write bits are removed for the call.
    """
    if os.getuid() != 0:
        modes = {p: os.stat(p).st_mode for p in paths}
        for p in paths:
            os.chmod(p, stat.S_IMODE(modes[p]) & ~0o222)
        try:
            return fn()
        finally:
            for p, m in modes.items():
                os.chmod(p, stat.S_IMODE(m))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            result = fn()
        except BaseException as e:  # report, never run the parent's pytest in the child
            result = e
        try:
            data = pickle.dumps(result)
        except Exception:
            data = pickle.dumps(RuntimeError(repr(result)))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = pickle.loads(data)
    if isinstance(result, BaseException):
        raise result
    return result


def _try(fn):
    try:
        return ("ok", fn())
    except Exception as e:
        return (type(e).__name__, str(e))


def read_then_try_writes(path):
    q = StaggerQueue(path)
    try:
        return {
            "read": [m for _, m in q.consume(wait=False)],
            "len": len(q),
            "last_seq": q.last_seq,
            "write": _try(lambda: q.write("no")),
            "write_many": _try(lambda: q.write_many(["no"])),
            "purge": _try(lambda: q.purge()),
        }
    finally:
        q.close()


def make_queue(path):
    q = StaggerQueue(path, mode=0o644)
    q.write_many(["a", "b"])
    q.close()


def test_read_only_file_and_directory_reads_work_writes_are_permission_errors(shared_dir):
    path = os.path.join(shared_dir, "q.db")
    make_queue(path)  # leaves its -wal and -shm: SQLite can read without creating them
    files = [path + s for s in ("", "-wal", "-shm", ".lock")]
    for p in files:
        os.chmod(p, 0o644)
    before = snapshot(path)
    got = without_write_access(files + [shared_dir], lambda: read_then_try_writes(path))
    assert got["read"] == ["a", "b"] and got["len"] == 2 and got["last_seq"] == 2
    for op in ("write", "write_many", "purge"):
        assert got[op][0] == "PermissionError", got
    assert snapshot(path) == before
    with StaggerQueue(path) as q:
        assert len(q) == 2


def test_read_only_file_in_a_writable_directory(shared_dir):
    path = os.path.join(shared_dir, "q.db")
    make_queue(path)
    for s in ("", "-wal", "-shm"):
        os.chmod(path + s, 0o644)
    os.chmod(path + ".lock", 0o666)  # the lock is takeable; the file itself is not writable
    os.chmod(shared_dir, 0o777)
    got = without_write_access([path, path + "-wal", path + "-shm"], lambda: read_then_try_writes(path))
    assert got["read"] == ["a", "b"]
    for op in ("write", "write_many", "purge"):
        assert got[op][0] == "PermissionError", got
        assert path in got[op][1]
        assert "apsw" not in got[op][1]
    with StaggerQueue(path) as q:
        assert len(q) == 2 and q.last_seq == 2


def test_read_only_directory_without_wal_files_is_a_clear_permission_error(shared_dir):
    path = os.path.join(shared_dir, "q.db")
    make_queue(path)
    con = sqlite3.connect(path)  # fold the WAL in, then remove -wal/-shm
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for s in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + s)
    os.chmod(path, 0o644)
    got = without_write_access([path, path + ".lock", shared_dir], lambda: _try(lambda: read_then_try_writes(path)))
    assert got[0] == "PermissionError", got
    assert path in got[1]
    assert "reads still work" not in got[1]  # here they do not: say why instead
    assert "-shm" in got[1]


def test_creating_in_a_read_only_directory_is_a_permission_error(shared_dir):
    path = os.path.join(shared_dir, "new.db")
    got = without_write_access([shared_dir], lambda: _try(lambda: StaggerQueue(path)))
    assert got[0] == "PermissionError", got
    assert os.listdir(shared_dir) == []
