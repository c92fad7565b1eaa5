"""The worker pool (SPEC §7), through the real CLI in subprocesses and from Python.

Handlers below are module-level so worker processes (spawned) import them as
``tests.test_workers:<name>``. Each records what it handled as one line
``<msg> <pid> <time>`` appended (O_APPEND: whole lines, even across
processes) to the file named by STAGGER_TEST_OUT.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from stagger_sqlite import StaggerQueue, WorkerPool
from stagger_sqlite import control
from stagger_sqlite.workers import HandlerError

from .helpers import wait_for

CLI = [sys.executable, "-m", "stagger_sqlite"]


def _record(msg):
    line = f"{msg} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(os.environ["STAGGER_TEST_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record(msg):
    _record(msg)


def record_slowly(msg):
    time.sleep(0.02)
    _record(msg)


def record_then_linger(msg):
    _record(msg)  # when the handler starts: what a rate-limited API would see
    time.sleep(0.15)


def record_but_13(msg):
    if msg == 13:
        raise ValueError("13 is unlucky")
    _record(msg)


def record_but_exit_on_13(msg):
    if msg == 13:
        raise SystemExit(13)  # a handler that quits: the message's failure, not a stop
    _record(msg)


def record_batch(msgs):
    assert isinstance(msgs, list)
    _record(",".join(map(str, msgs)))


def record_batch_but_13(msgs):
    if 13 in msgs:
        _record("FAIL:" + ",".join(map(str, msgs)))
        raise ValueError("a list with 13")
    _record(",".join(map(str, msgs)))


def records(path):
    """[(msg, pid, time)] recorded so far."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        msg, pid, t = line.split()
        out.append((msg, int(pid), float(t)))
    return out


@pytest.fixture
def out(tmp_path, monkeypatch):
    path = str(tmp_path / "handled.txt")
    monkeypatch.setenv("STAGGER_TEST_OUT", path)
    return path


def fill(qpath, n):
    with StaggerQueue(qpath) as q:
        q.write_many(range(1, n + 1))


def work(qpath, *args, timeout=120):
    return subprocess.run(CLI + ["work", qpath, *args], capture_output=True, text=True, timeout=timeout)


def start_work(qpath, *args):
    return subprocess.Popen(CLI + ["work", qpath, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def group_info(qpath, group):
    with StaggerQueue(qpath) as q:
        return q.groups().get(group)


def test_two_processes_finish_500_and_dead_letter_the_failing_one(qpath, out):
    fill(qpath, 500)
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record_but_13",
             "--processes", "2", "--max-attempts", "2", "--until-idle", "0.5")
    assert r.returncode == 0, r.stderr
    handled = [int(m) for m, _, _ in records(out)]
    assert sorted(handled) == [n for n in range(1, 501) if n != 13]  # each exactly once: nothing crashed
    with StaggerQueue(qpath) as q:
        dead = q.dead_letters("g")
        info = q.groups()["g"]
    assert [(d.seq, d.msg, d.attempts) for d in dead] == [(13, 13, 2)]
    assert "13 is unlucky" in dead[0].error
    assert (info.acked, info.in_flight, info.retrying, info.dead) == (500, 0, 0, 1)


def test_a_handler_raising_system_exit_is_a_failure_that_dead_letters(qpath, out):
    fill(qpath, 20)
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record_but_exit_on_13",
             "--processes", "2", "--max-attempts", "2", "--until-idle", "0.5")
    assert r.returncode == 0, r.stderr
    assert sorted(int(m) for m, _, _ in records(out)) == [n for n in range(1, 21) if n != 13]
    with StaggerQueue(qpath) as q:
        (dead,) = q.dead_letters("g")
        assert (dead.seq, dead.attempts) == (13, 2) and "SystemExit" in dead.error


def test_until_idle_counts_messages_handled_between_its_looks(qpath, out):
    """A message written and handled between two of the pool's looks at the
    group still resets the idle clock: a steady trickle keeps the pool on."""
    fill(qpath, 1)
    pool = WorkerPool(qpath, "g", record, processes=1, until_idle=1.0)
    runner = threading.Thread(target=pool.run)
    runner.start()
    try:
        with StaggerQueue(qpath) as q:
            for n in range(2, 12):  # one every 0.3 s: never 1 s without work
                time.sleep(0.3)
                q.write(n)
        runner.join(60)
    finally:
        pool.stop()
        runner.join(60)
    assert sorted(int(m) for m, _, _ in records(out)) == list(range(1, 12))


def test_rate_limit_holds_for_the_whole_group_across_processes(qpath, out):
    fill(qpath, 40)
    started = time.monotonic()
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record",
             "--processes", "2", "--rate", "20/s", "--until-idle", "0.3")
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert sorted(int(m) for m, _, _ in records(out)) == list(range(1, 41))
    # 20/s for the whole group: 40 hand-outs span at least 39/20 s, whichever
    # process made them. A lower bound: the limiter's correctness, not speed.
    assert took >= 1.95
    assert len({pid for _, pid, _ in records(out)}) <= 2


def test_rate_limit_holds_for_when_handlers_start(qpath, out):
    """A handler slower than the rate's spacing, in two processes: a claim
    of several messages would hand them out at once and the handler would
    start on them one after another, late, while the other process's claims
    go on (12 starts in a second at 10/s, before the fix). What an API
    behind the handler sees is the handler's starts: at most 10 a second."""
    fill(qpath, 30)
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record_then_linger",
             "--processes", "2", "--rate", "10/s", "--until-idle", "0.5")
    assert r.returncode == 0, r.stderr
    starts = sorted(t for _, _, t in records(out))
    assert len(starts) == 30
    worst = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert worst <= 10, f"{worst} handler starts in one second at --rate 10/s"


def test_rate_limiter_never_puts_more_than_n_in_a_window(qpath):
    """Claims at chosen times, as many as allowed, through the limiter's row
    in the file: no window of one second ever holds more than 5 hand-outs."""
    limiter = control.RateLimiter("g", control.parse_rate("5/s"))
    handouts = []
    with StaggerQueue(qpath) as q:
        t = 1000.0
        for step in [0.0, 0.01, 0.3, 0.05, 2.0, 0.19, 0.21, 0.7, 0.0, 1.3, 0.4] * 5:
            t += step

            def claim(conn, t=t):
                n, _ = limiter.allow(conn, t, 50)
                if n:
                    limiter.spend(conn, t, n)
                return n

            handouts += [t] * q._storage.write(claim)
    assert len(handouts) > 30
    for start in handouts:
        assert sum(1 for h in handouts if start <= h < start + 1.0) <= 5


def test_batch_handler_gets_lists(qpath, out):
    fill(qpath, 25)
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record_batch",
             "--processes", "1", "--batch-handler", "--batch", "10", "--until-idle", "0.3")
    assert r.returncode == 0, r.stderr
    batches = [[int(x) for x in m.split(",")] for m, _, _ in records(out)]
    assert sorted(x for b in batches for x in b) == list(range(1, 26))
    assert max(len(b) for b in batches) == 10


def test_batch_handler_in_two_processes_gets_each_message_once(qpath, out):
    fill(qpath, 1000)
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record_batch",
             "--processes", "2", "--batch-handler", "--batch", "20", "--until-idle", "0.5")
    assert r.returncode == 0, r.stderr
    batches = [[int(x) for x in m.split(",")] for m, _, _ in records(out)]
    assert sorted(x for b in batches for x in b) == list(range(1, 1001))  # each exactly once: nobody died
    assert max(len(b) for b in batches) == 20 and all(b == sorted(b) for b in batches)
    info = group_info(qpath, "g")
    assert (info.acked, info.in_flight, info.retrying, info.dead) == (1000, 0, 0, 0)


def test_raising_batch_handler_nacks_the_whole_list(qpath, out):
    fill(qpath, 100)
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record_batch_but_13",
             "--processes", "1", "--batch-handler", "--batch", "10", "--max-attempts", "1", "--until-idle", "0.3")
    assert r.returncode == 0, r.stderr
    lines = [m for m, _, _ in records(out)]
    [failed] = [[int(x) for x in m[5:].split(",")] for m in lines if m.startswith("FAIL:")]
    handled = [int(x) for m in lines if not m.startswith("FAIL:") for x in m.split(",")]
    assert 13 in failed and len(failed) == 10
    with StaggerQueue(qpath) as q:
        dead = q.dead_letters("g")
    # max_attempts=1: every message of the failed list is dead-lettered with the error, nothing else.
    assert [d.seq for d in dead] == failed
    assert all("a list with 13" in d.error for d in dead)
    assert sorted(handled) == sorted(set(range(1, 101)) - set(failed))  # the rest once each


def test_pool_stops_when_its_group_is_dropped(qpath, out):
    fill(qpath, 300)
    p = start_work(qpath, "--group", "g", "--handler", "tests.test_workers:record_slowly", "--processes", "2")
    try:
        wait_for(lambda: len(records(out)) >= 10, 60, message="work under way")
        r = subprocess.run(CLI + ["drop-group", qpath, "--group", "g"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert "dropped" in p.stderr.read()
    with StaggerQueue(qpath) as q:
        assert q.groups() == {}  # no worker created it again
        assert q.purge() == 300


def test_pause_stops_every_worker_and_resume_restarts_them(qpath, out):
    fill(qpath, 300)
    p = start_work(qpath, "--group", "g", "--handler", "tests.test_workers:record_slowly", "--processes", "2")
    try:
        wait_for(lambda: len({pid for _, pid, _ in records(out)}) == 2, 60, message="both workers busy")
        r = subprocess.run(CLI + ["pause", qpath, "--group", "g"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

        def settled():
            before = len(records(out))
            time.sleep(0.3)
            return before == len(records(out)) and group_info(qpath, "g").in_flight == 0

        wait_for(settled, 60, message="every worker stopped taking messages")
        paused_at = len(records(out))
        assert paused_at < 300
        time.sleep(1.0)  # a paused group stays paused: nothing more is handed out
        assert len(records(out)) == paused_at
        r = subprocess.run(CLI + ["resume", qpath, "--group", "g"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(records(out)) >= 300, 60, message="all handled after resume")
        after = {pid for m, pid, _ in records(out)[paused_at:]}
        assert len(after) == 2  # both workers took messages again
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    assert sorted(int(m) for m, _, _ in records(out)) == list(range(1, 301))


def test_sigterm_exits_0_and_loses_nothing(qpath, out):
    fill(qpath, 300)
    p = start_work(qpath, "--group", "g", "--handler", "tests.test_workers:record_slowly", "--processes", "2")
    wait_for(lambda: len(records(out)) >= 20, 60, message="work under way")
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0, p.stderr.read()
    assert "Traceback" not in p.stderr.read()
    info = group_info(qpath, "g")
    # What was in hand was finished, the claimed rest released: nothing waits for a lease.
    assert info.in_flight == 0
    assert info.acked < 300
    r = work(qpath, "--group", "g", "--handler", "tests.test_workers:record", "--processes", "1", "--until-idle", "0.3")
    assert r.returncode == 0, r.stderr
    handled = [int(m) for m, _, _ in records(out)]
    assert sorted(set(handled)) == list(range(1, 301))
    assert len(handled) == 300  # a graceful stop reruns nothing


def test_a_killed_worker_is_restarted_and_its_messages_come_back(qpath, out):
    fill(qpath, 200)
    p = start_work(qpath, "--group", "g", "--handler", "tests.test_workers:record_slowly",
                   "--processes", "2", "--lease", "2", "--batch", "5")
    try:
        wait_for(lambda: len({pid for _, pid, _ in records(out)}) == 2, 60, message="both workers busy")
        victim = records(out)[-1][1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: {int(m) for m, _, _ in records(out)} >= set(range(1, 201)), 90, message="all handled")
        pids = {pid for _, pid, _ in records(out)}
        assert len(pids) >= 3  # a new worker process took over
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    assert group_info(qpath, "g").acked == 200


def test_worker_pool_from_python(qpath, out):
    fill(qpath, 50)
    pool = WorkerPool(qpath, "py", record, processes=2, until_idle=0.3)
    assert pool.run() == 0
    assert sorted(int(m) for m, _, _ in records(out)) == list(range(1, 51))


def test_worker_pool_validates_its_arguments(qpath):
    with pytest.raises(ValueError, match="handler"):
        WorkerPool(qpath, "g", "no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="rate"):
        WorkerPool(qpath, "g", record, rate="5/fortnight")
    with pytest.raises(ValueError, match="processes"):
        WorkerPool(qpath, "g", record, processes=0)
    with pytest.raises(ValueError, match="lease"):
        WorkerPool(qpath, "g", record, lease=0)  # every worker would die at start, forever
    with pytest.raises(ValueError, match="rate"):
        WorkerPool(qpath, "g", record, rate=5)


def test_a_handler_that_cannot_reach_a_worker_process_is_refused_at_once(qpath):
    """Workers are spawned, so a callable handler travels pickled: a lambda
    or a nested function is a HandlerError at construction, not a failure
    in the middle of run()."""

    def nested(msg):
        pass

    for handler in (lambda msg: None, nested):
        with pytest.raises(HandlerError, match="module level"):
            WorkerPool(qpath, "g", handler)
    WorkerPool(qpath, "g", record)  # a module-level function is fine


def test_a_slower_rate_left_in_the_file_does_not_stall_a_faster_pool(qpath):
    """The limiter's due time is shared through the file; one set by a pool
    at 2/h holds a later pool at 100/s back no longer than 100/s allows."""
    slow = control.RateLimiter("g", control.parse_rate("2/h"))
    fast = control.RateLimiter("g", control.parse_rate("100/s"))
    with StaggerQueue(qpath) as q:
        now = time.time()
        q._storage.write(lambda conn: slow.spend(conn, now, 1))  # next hand-out due in 30 min
        n, due = q._storage.write(lambda conn: fast.allow(conn, now + 1.0, 10))
        assert n == 10 and due <= now + 1.0
        assert q._storage.read(lambda conn: slow.allow(conn, now + 1.0, 1))[0] == 0  # the slow pool still waits


def _pids_of_children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_of_a_pool_killed_with_sigkill_stop_by_themselves(qpath, out):
    fill(qpath, 100_000)
    p = start_work(qpath, "--group", "g", "--handler", "tests.test_workers:record_slowly", "--processes", "2")
    wait_for(lambda: len({pid for _, pid, _ in records(out)}) == 2, 60, message="both workers busy")
    workers = {pid for _, pid, _ in records(out)}
    assert workers <= set(_pids_of_children(p.pid))
    p.kill()  # SIGKILL: the pool cannot tell its workers anything
    p.wait(60)
    wait_for(lambda: not any(_alive(w) for w in workers), 60, message="the orphaned workers to exit")
    info = group_info(qpath, "g")
    assert info.in_flight == 0  # each finished what it held and released the rest




def test_parse_rate():
    assert control.parse_rate("100/s").interval == pytest.approx(0.01)
    assert control.parse_rate("6/m").interval == pytest.approx(10.0)
    assert control.parse_rate("2/h").interval == pytest.approx(1800.0)
    for bad in ("", "10", "0/s", "-1/s", "10/y", "x/s"):
        with pytest.raises(ValueError):
            control.parse_rate(bad)
