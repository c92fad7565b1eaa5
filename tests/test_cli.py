"""The command line (SPEC §9), run for real in subprocesses."""

import datetime
import json
import os
import signal
import subprocess
import sys

import pytest

from stagger_sqlite import StaggerQueue

from .helpers import wait_for

CLI = [sys.executable, "-m", "stagger_sqlite"]


def run(*args, input=None, timeout=120):
    return subprocess.run(CLI + list(args), input=input, capture_output=True, text=True, timeout=timeout)


def lines(text):
    return [json.loads(line) for line in text.splitlines()]


def assert_one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""


def test_write_read_info_round_trip(qpath):
    r = run("write", qpath, '{"order": 17}', '"hello"', "[1, 2]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "2", "3"]
    r = run("write", qpath, "-q", input='{"from": "stdin"}\n\n4\n')
    assert r.returncode == 0 and r.stdout == ""
    r = run("read", qpath)
    assert lines(r.stdout) == [
        {"seq": 1, "msg": {"order": 17}}, {"seq": 2, "msg": "hello"}, {"seq": 3, "msg": [1, 2]},
        {"seq": 4, "msg": {"from": "stdin"}}, {"seq": 5, "msg": 4},
    ]
    assert lines(run("read", qpath, "--ack", "3").stdout) == [{"seq": 4, "msg": {"from": "stdin"}}, {"seq": 5, "msg": 4}]
    stats = json.loads(run("info", qpath, "--json").stdout)
    assert (stats["last_seq"], stats["stored"], stats["groups"]) == (5, 5, {})
    assert stats["bytes"] > 0
    with StaggerQueue(qpath) as q:  # what the library sees
        assert q.last_seq == 5 and list(q.consume(ack=4, wait=False)) == [(5, 4)]
    r = run("info", qpath)
    assert r.returncode == 0 and "last_seq  5" in r.stdout


def test_read_with_a_group_acks_what_it_printed(qpath):
    run("write", qpath, "1", "2", "3")
    assert [m["seq"] for m in lines(run("read", qpath, "--group", "g", "--limit", "2").stdout)] == [1, 2]
    assert [m["seq"] for m in lines(run("read", qpath, "--group", "g").stdout)] == [3]
    assert run("read", qpath, "--group", "g").stdout == ""
    info = json.loads(run("info", qpath, "--json").stdout)["groups"]["g"]
    assert (info["acked"], info["in_flight"], info["lag"]) == (3, 0, 0)
    r = run("info", qpath)
    assert "g" in r.stdout and "acked" in r.stdout


def test_read_follow_prints_new_messages_as_they_come(qpath):
    run("write", qpath, "1")
    p = subprocess.Popen(CLI + ["read", qpath, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(p.stdout.readline()) == {"seq": 1, "msg": 1}
        run("write", qpath, '"later"')
        assert json.loads(p.stdout.readline()) == {"seq": 2, "msg": "later"}
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
    assert "Traceback" not in p.stderr.read()


def test_read_renders_non_json_values(qpath):
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    with StaggerQueue(qpath) as q:
        q.write({"b": b"\x00\xff", "t": when, "s": {3}})
    assert lines(run("read", qpath).stdout) == [
        {"seq": 1, "msg": {"b": {"$bytes": "AP8="}, "t": "2026-01-02T03:04:05+00:00", "s": [3]}}
    ]


def test_read_prints_strict_json_for_any_message(qpath):
    # Maps with keys JSON cannot hold, NaN and infinities: spelled out, so
    # every line parses with a strict JSON parser.
    with StaggerQueue(qpath) as q:
        q.write_many([{b"k": 1}, {(1, 2): "x"}, float("nan"), [float("inf"), {"a": float("-inf")}], {1: "one"}])
    r = run("read", qpath)
    assert r.returncode == 0 and "Traceback" not in r.stderr

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    assert [strict(line)["msg"] for line in r.stdout.splitlines()] == [
        {"$map": [[{"$bytes": "aw=="}, 1]]},
        {"$map": [[[1, 2], "x"]]},
        {"$float": "nan"},
        [{"$float": "inf"}, {"a": {"$float": "-inf"}}],
        {"1": "one"},
    ]


def test_raw_and_json_codecs(qpath):
    assert run("write", qpath, "--codec", "raw", "-q", "plain text").returncode == 0
    assert lines(run("read", qpath, "--codec", "raw").stdout) == [{"seq": 1, "msg": {"$bytes": "cGxhaW4gdGV4dA=="}}]


def test_purge_dead_requeue(qpath):
    run("write", qpath, "1", "2", "3")
    with StaggerQueue(qpath) as q:
        with q.consume(group="g", max_attempts=1, wait=False) as c:
            for seq, msg in c:
                if msg == 2:
                    c.nack(seq, error="two failed")
    dead = lines(run("dead", qpath, "--group", "g").stdout)
    assert dead == [{"seq": 2, "attempts": 1, "error": "two failed", "msg": 2}]
    assert run("requeue", qpath, "--group", "g").stdout.strip() == "1"
    assert run("dead", qpath, "--group", "g").stdout == ""
    assert run("purge", qpath).stdout.strip() == "1"  # seq 2 is not finished by group g again
    with StaggerQueue(qpath) as q:
        assert [s for s, _ in q.consume(wait=False)] == [2, 3]


def test_mistakes_of_dead_requeue_work_and_forward_are_one_line_errors(qpath, tmp_path):
    run("write", qpath, "1")
    for args in (
        ["dead", qpath, "--group", "typo"],  # an unknown group, as drop-group says
        ["requeue", qpath, "--group", "typo"],
        ["work", qpath, "--group", "g", "--handler", "json:dumps", "--lease", "0"],
        ["forward", qpath, "--url", "http://127.0.0.1:9/", "--lease", "0"],
        ["forward", qpath, "--url", "http://127.0.0.1:9/", "--timeout", "0"],
        ["forward", qpath, "--url", "http://127.0.0.1:abc/"],  # a port that is no number
        ["forward", str(tmp_path / "missing.db"), "--url", "http://127.0.0.1:9/"],  # forwards from nothing
    ):
        r = run(*args, timeout=60)
        assert_one_line_error(r)
    assert not os.path.exists(tmp_path / "missing.db")


def test_pause_and_resume_set_the_shared_flag(qpath):
    run("write", qpath, "1")
    with StaggerQueue(qpath) as q:
        q.consume(group="g").close()
    assert run("pause", qpath, "--group", "g").returncode == 0
    with StaggerQueue(qpath) as q:
        assert q.groups()["g"].paused
    assert "(paused)" in run("info", qpath).stdout
    assert run("read", qpath, "--group", "g").stdout == ""  # a paused group hands out nothing
    assert run("resume", qpath, "--group", "g").returncode == 0
    with StaggerQueue(qpath) as q:
        assert not q.groups()["g"].paused
    assert lines(run("read", qpath, "--group", "g").stdout) == [{"seq": 1, "msg": 1}]


def test_drop_group(qpath):
    run("write", qpath, "1", "2")
    with StaggerQueue(qpath) as q:
        q.consume(group="old").close()
        with q.consume(group="new", wait=False) as c:
            assert [s for s, _ in c] == [1, 2]
    assert run("purge", qpath).stdout.strip() == "0"  # group "old" finished nothing
    r = run("drop-group", qpath, "--group", "old")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert run("purge", qpath).stdout.strip() == "2"
    r = run("drop-group", qpath, "--group", "old")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no group 'old'" in r.stderr
    with StaggerQueue(qpath) as q:
        assert list(q.groups()) == ["new"]


def test_check_passes_a_good_file_and_fails_a_damaged_one(qpath):
    run("write", qpath, "-q", input="".join(f'{{"n": {i}, "pad": "{"x" * 200}"}}\n' for i in range(2000)))
    r = run("check", qpath)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    with StaggerQueue(qpath) as q:
        q.close()
    size = os.path.getsize(qpath)
    with open(qpath, "r+b") as f:  # scribble over pages in the middle (not the header)
        f.seek(size // 2)
        f.write(os.urandom(8192))
    r = run("check", qpath)
    assert r.returncode != 0 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, stdin, words", [
    (["info", "{dir}/missing.db"], None, "no such queue file"),
    (["read", "{dir}/missing.db"], None, "no such queue file"),
    (["write", "{q}", "{{bad"], None, "bad JSON"),
    (["write", "{q}"], '1\n{{bad\n', "stdin line 2"),
    (["write", "{q}", "[" * 5000 + "]" * 5000], None, "nested too deeply"),
    (["forward", "{q}", "--url", "http://127.0.0.1:9/", "--timeout", "inf"], None, "finite"),
    (["work", "{q}", "--group", "g", "--handler", "no_such_module_xyz:run"], None, "cannot import"),
    (["work", "{q}", "--group", "g", "--handler", "not-a-handler"], None, "module:function"),
    (["work", "{q}", "--group", "g", "--handler", "os:path", "--rate", "10/fortnight"], None, "bad rate"),
    (["read", "{q}", "--ack", "99"], None, "never written"),
    (["read", "{q}", "--group", ""], None, "non-empty"),
    (["info", "{notq}"], None, "not a SQLite file"),
    (["serve", "{q}", "--bind", "nonsense"], None, "HOST:PORT"),
    (["nosuchcommand"], None, "invalid choice"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, qpath, args, stdin, words):
    run("write", qpath, "-q", "1")
    notq = tmp_path / "notq.db"
    notq.write_text("just text, certainly not a queue " * 10)
    argv = [a.format(dir=tmp_path, q=qpath, notq=notq) for a in args]
    r = run(*argv, input=stdin)
    assert_one_line_error(r)
    assert words in r.stderr


def test_help_has_every_command(capsys):
    from stagger_sqlite.cli import main

    r = run("--help")  # the real entry point once; each command's help in-process
    for command in ("info", "write", "read", "purge", "dead", "requeue", "check", "pause", "resume",
                    "drop-group", "work", "serve", "forward", "bench", "demo"):
        assert command in r.stdout
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
        assert "Example:" in capsys.readouterr().out


def test_demo_runs_and_reports_nothing_lost(tmp_path):
    r = run("demo", "--path", str(tmp_path / "demo.db"), "--messages", "1500", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "nothing lost" in r.stderr and "lost: 0" in r.stderr
    assert "worker restarts: 1" in r.stderr  # the worker it killed came back


def test_bench_runs(tmp_path):
    r = run("bench", "--seconds", "0.2", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "write_many" in r.stdout


def test_bench_quick_measures_every_operation_and_leaves_nothing(tmp_path):
    r = run("bench", "--quick", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for operation in ("durability=full", "durability=normal", "write_many", "consume(ack)", "group"):
        assert operation in r.stdout, (operation, r.stdout)
    assert os.listdir(tmp_path) == []  # the scratch queues are removed


def test_write_shows_progress_on_a_terminal_for_large_input(qpath):
    import pty

    master, slave = pty.openpty()
    try:
        data = "".join(f"{i}\n" for i in range(25000))
        p = subprocess.run(CLI + ["write", qpath, "-q"], input=data.encode(), stdout=subprocess.PIPE,
                           stderr=slave, timeout=120)
        os.close(slave)
        slave = None
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0
    assert b"written 25000" in shown
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 25000
