"""Hostile environment: read-only files and directories, a lock file that
cannot be created, another program holding SQLite's write lock or a long
read, file modes.

The suite runs as root (here and in CI), and root ignores permission bits,
so "read-only" is made two ways that bind root too or do not involve it:
a read-only bind mount (EROFS), and a child process that drops to the
``nobody`` user (EACCES). Each is skipped, saying why, where the machine
cannot do it.
"""

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from stagger_sqlite import LockTimeoutError, StaggerQueue
from tests.faults import ROOT, figure


def make_queue(path, n=3):
    with StaggerQueue(path) as q:
        q.write_many([{"i": i} for i in range(n)])


@pytest.fixture
def ro_view(tmp_path):
    """(writable dir, the same dir mounted read-only)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        yield src, ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)


def test_read_only_mount_reads_work_writes_refused(ro_view):
    src, ro = ro_view
    make_queue(str(src / "q.db"))
    path = str(ro / "q.db")
    with StaggerQueue(path) as q:
        assert [s for s, _ in q.consume(0, wait=False)] == [1, 2, 3]
        assert len(q) == 3 and q.last_seq == 3 and q.stats()["stored"] == 3
        for attempt in (lambda: q.write({"x": 1}), lambda: q.write_many([1, 2]), q.purge):
            with pytest.raises(PermissionError) as e:
                attempt()
            assert path in str(e.value) or str(ro) in str(e.value)
            assert "\n" not in str(e.value)
        assert len(q) == 3
    with pytest.raises(PermissionError):
        StaggerQueue(str(ro / "new.db"))
    assert not os.path.exists(ro / "new.db")


def test_serve_and_forward_on_a_read_only_queue_fail_cleanly(ro_view):
    """serve answers a write it cannot make with a 500 (not a dropped
    connection); forward, which must write its group's claims, exits 1 with
    one line (not a dead thread and a process forwarding nothing forever)."""
    import http.client
    import re
    import signal
    import sys

    src, ro = ro_view
    make_queue(str(src / "q.db"))
    path = str(ro / "q.db")
    cli = [sys.executable, "-m", "stagger_sqlite"]
    r = subprocess.run(cli + ["forward", path, "--url", "http://127.0.0.1:9/"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("stagger-sqlite: error:") and path in r.stderr
    p = subprocess.Popen(cli + ["serve", path, "--bind", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://([\d.]+):(\d+)/", p.stderr.readline())
        c = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=30)
        c.request("POST", "/", body=b"x")
        reply = c.getresponse()
        assert reply.status == 500 and b"writes are refused" in reply.read()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    assert "Traceback" not in p.stderr.read()


def as_nobody(code):
    """Run ``code`` in a child that drops to the ``nobody`` user where
    ``DROP`` stands (after its imports: the interpreter itself lives in
    root's home); its last stdout line is JSON."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` user to drop to")
    if os.getuid() != 0:
        pytest.skip("not root: cannot drop to another user")
    prelude = f"import os; os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); "
    r = subprocess.run([sys.executable, "-c", code.replace("DROP", prelude)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


PROBE = """
import json
import stagger_sqlite.groups, stagger_sqlite.consume
from stagger_sqlite import StaggerQueue
DROP
out = {}
try:
    q = StaggerQueue(PATH)
    out["read"] = [s for s, _ in q.consume(0, wait=False)]
    try:
        q.write({"x": 1})
        out["write"] = "ok"
    except Exception as e:
        out["write"] = [type(e).__name__, isinstance(e, PermissionError), str(e)]
except Exception as e:
    out["open"] = [type(e).__name__, isinstance(e, PermissionError), str(e)]
print(json.dumps(out))
"""


@pytest.fixture
def shared_dir():
    """A directory ``nobody`` can reach (tmp_path's parents are root-only)."""
    d = tempfile.mkdtemp(prefix="stagger-hostile-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", d])


def test_file_readable_not_writable(shared_dir):
    path = os.path.join(shared_dir, "q.db")
    make_queue(path)
    for p in (path, path + "-wal", path + "-shm", path + ".lock"):
        if os.path.exists(p):
            os.chmod(p, 0o644)
    out = as_nobody(PROBE.replace("PATH", repr(path)))
    assert out.get("read") == [1, 2, 3], out
    name, is_perm, msg = out["write"]
    assert is_perm and path in msg, out


def test_lock_file_cannot_be_created(shared_dir):
    """The queue file is writable, the directory is not: no lock file can be
    made. Reads work; writes fail with a PermissionError naming it."""
    path = os.path.join(shared_dir, "q.db")
    make_queue(path)
    os.unlink(path + ".lock")
    for p in (path, path + "-wal", path + "-shm"):
        if os.path.exists(p):
            os.chmod(p, 0o666)
    out = as_nobody(PROBE.replace("PATH", repr(path)))
    assert out.get("read") == [1, 2, 3], out
    name, is_perm, msg = out["write"]
    assert is_perm and path + ".lock" in msg, out


def test_unreadable_file(shared_dir):
    path = os.path.join(shared_dir, "q.db")
    make_queue(path)  # 0600, root's: nobody can do nothing with it
    out = as_nobody(PROBE.replace("PATH", repr(path)))
    name, is_perm, msg = out["open"]
    assert is_perm and path in msg, out


HOLDER = """
import apsw, sys, time
conn = apsw.Connection(sys.argv[1])
conn.execute(sys.argv[2])
if sys.argv[2] == "BEGIN":
    conn.execute("SELECT count(*) FROM messages").fetchall()
print("holding", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def hold(path, begin):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path, begin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def release(p):
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(30) == 0


def test_foreign_write_transaction_gives_lock_timeout(qpath):
    make_queue(qpath)
    holder = hold(qpath, "BEGIN IMMEDIATE")
    try:
        with StaggerQueue(qpath, timeout=1.0) as q:
            t0 = time.monotonic()
            for attempt in (lambda: q.write({"x": 1}), lambda: q.write_many([1, 2]), q.purge):
                with pytest.raises(LockTimeoutError) as e:
                    attempt()
                assert qpath in str(e.value)
                # Not even as text: what users see is our error, not SQLite's.
                assert "database is locked" not in str(e.value)
            waited = time.monotonic() - t0
            assert waited >= 3 * 0.9, "a write gave up before its timeout"
            # Readers are not blocked by a writer (WAL).
            assert [s for s, _ in q.consume(0, wait=False)] == [1, 2, 3]
            assert q.last_seq == 3 and len(q) == 3
    finally:
        release(holder)
    with StaggerQueue(qpath, timeout=1.0) as q:
        assert q.write({"x": 1}) == 4


def test_foreign_write_transaction_released_within_timeout(qpath):
    make_queue(qpath)
    holder = hold(qpath, "BEGIN IMMEDIATE")
    with StaggerQueue(qpath, timeout=30) as q:
        import threading

        threading.Timer(0.5, release, (holder,)).start()
        assert q.write({"x": 1}) == 4  # waited, then went through


def test_foreign_long_read_does_not_block_writes(qpath):
    make_queue(qpath)
    holder = hold(qpath, "BEGIN")
    try:
        with StaggerQueue(qpath, timeout=5) as q:
            seqs = [q.write({"i": i, "pad": "x" * 2000}) for i in range(300)]
            assert seqs[-1] == 303
    finally:
        release(holder)


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_files_created_with_mode(tmp_path, mode):
    old = os.umask(0)
    try:
        path = str(tmp_path / "q.db")
        with StaggerQueue(path, mode=mode) as q:
            q.write({"secret": 1})
            files = [path, path + ".lock", path + "-wal", path + "-shm"]
            modes = {os.path.basename(p): stat.S_IMODE(os.stat(p).st_mode) for p in files if os.path.exists(p)}
    finally:
        os.umask(old)
    assert modes == {os.path.basename(p): mode for p in files}, modes
    figure(f"file modes {mode:o}", **{k: oct(v) for k, v in modes.items()})


SPECIAL_PROBE = """
import sys
from stagger_sqlite import NotAQueueError, StaggerQueue
try:
    StaggerQueue(sys.argv[1])
except NotAQueueError as e:
    print("refused:", e)
else:
    print("opened")
"""


@pytest.mark.parametrize("kind", ["null device", "fifo", "socket"])
def test_special_files_are_refused_and_left_alone(tmp_path, kind):
    """A device node, FIFO or socket is never a queue: refused at once (a FIFO
    must not hang the open), and never replaced by one. (Found when an empty
    device, /dev/null, was taken for a missing file and renamed over.)"""
    import socket

    path = str(tmp_path / "special")
    keep = None
    if kind == "null device":
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("cannot make a device node here")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        keep = socket.socket(socket.AF_UNIX)
        keep.bind(path)
    before = os.stat(path)
    try:
        r = subprocess.run([sys.executable, "-c", SPECIAL_PROBE, path], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening a {kind} hung")
    finally:
        if keep is not None:
            keep.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused:") and path in r.stdout, r.stdout
    after = os.stat(path)
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino, stat.S_IFMT(before.st_mode))
    assert sorted(os.listdir(tmp_path)) == ["special"], "files were created beside it"
