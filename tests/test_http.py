"""``serve`` and ``forward`` (SPEC §8): the real CLI in subprocesses, real HTTP
clients and servers on 127.0.0.1."""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cbor2
import pytest

from stagger_sqlite import StaggerQueue

from .helpers import wait_for

CLI = [sys.executable, "-m", "stagger_sqlite"]


@pytest.fixture
def served(qpath):
    """A running ``serve`` on a free port: (host, port)."""
    p = subprocess.Popen(CLI + ["serve", qpath, "--bind", "127.0.0.1:0", "--max-body", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    m = re.search(r"http://([\d.]+):(\d+)/", line)
    assert m, line + p.stderr.read()
    yield m.group(1), int(m.group(2))
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    assert "Traceback" not in p.stderr.read()


def post(addr, body, content_type=None, method="POST", conn=None):
    c = conn or http.client.HTTPConnection(*addr, timeout=30)
    headers = {"Content-Type": content_type} if content_type else {}
    c.request(method, "/", body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    if conn is None:
        c.close()
    return r.status, dict(r.getheaders()), json.loads(data) if data else None


def test_serve_writes_json_cbor_and_raw_bodies_and_replies_with_the_seqno(served, qpath):
    conn = http.client.HTTPConnection(*served, timeout=30)  # one keep-alive connection
    status, headers, body = post(served, json.dumps({"order": 17}), "application/json", conn=conn)
    assert (status, body, headers["Stagger-Seq"]) == (200, {"seq": 1}, "1")
    status, headers, body = post(served, b"\x00raw bytes\xff", "application/octet-stream", conn=conn)
    assert (status, body, headers["Stagger-Seq"]) == (200, {"seq": 2}, "2")
    status, _, body = post(served, cbor2.dumps({"n": [1, 2]}), "application/cbor", conn=conn)
    assert (status, body) == (200, {"seq": 3})
    status, _, body = post(served, b"no type", conn=conn)
    assert (status, body) == (200, {"seq": 4})
    conn.close()
    # The reply came after the write: another process reads it at once.
    with StaggerQueue(qpath) as q:
        assert list(q.consume(wait=False)) == [
            (1, {"order": 17}), (2, b"\x00raw bytes\xff"), (3, {"n": [1, 2]}), (4, b"no type")
        ]


def test_serve_refuses_bad_requests_with_clear_4xx(served, qpath):
    status, _, body = post(served, "{not json", "application/json")
    assert status == 400 and "JSON" in body["error"]
    status, _, body = post(served, b"\xff\x00", "application/cbor")
    assert status == 400 and "CBOR" in body["error"]
    status, _, body = post(served, b"\x01\x01", "application/cbor")  # one item, then a stray byte
    assert status == 400 and "after the first data item" in body["error"]
    status, _, body = post(served, b"x" * 1001, "application/octet-stream")
    assert status == 413 and "limit" in body["error"]
    status, headers, _ = post(served, None, method="GET")
    assert status == 405 and headers["Allow"] == "POST"
    with StaggerQueue(qpath) as q:
        assert q.last_seq == 0  # nothing of a refused request was written


def test_a_body_nested_too_deeply_is_a_bad_body():
    # (a unit test: the fixture's server takes bodies of 1,000 bytes at most)
    from stagger_sqlite.http import decode_body

    with pytest.raises(ValueError, match="bad JSON body: nested too deeply"):
        decode_body("application/json", b"[" * 100_000 + b"]" * 100_000)


def test_serve_port_in_use_is_one_line(qpath):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        r = subprocess.run(CLI + ["serve", qpath, "--bind", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    finally:
        s.close()
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


class Receiver:
    """A local HTTP server recording the Stagger-Seq of every 2xx it answered.

    ``fail_first``: answer that many requests with 503 first.
    ``refuse``: messages answered with 400 (to be dead-lettered).
    """

    def __init__(self, fail_first=0, refuse=()):
        self.ok = Counter()
        self.requests = 0
        self.fail_first = fail_first
        self.refuse = set(refuse)
        self.bodies = {}
        lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                seq = int(self.headers["Stagger-Seq"])
                with lock:
                    outer.requests += 1
                    n = outer.requests
                    if n <= outer.fail_first:
                        status = 503
                    elif json.loads(data) in outer.refuse:
                        status = 400
                    else:
                        status = 200
                        outer.ok[seq] += 1
                        outer.bodies[seq] = (self.headers["Content-Type"], data)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_forward_delivers_to_each_url_independently(qpath):
    healthy, flaky, picky = Receiver(), Receiver(fail_first=3), Receiver(refuse={7})
    with StaggerQueue(qpath) as q:
        q.write_many(range(1, 21))
    p = subprocess.Popen(CLI + ["forward", qpath, "--url", healthy.url, "--url", flaky.url, "--url", picky.url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        every = set(range(1, 21))
        wait_for(lambda: set(healthy.ok) == every and set(flaky.ok) == every
                 and set(picky.ok) == every - {7}, 90, message="every destination served")
        with StaggerQueue(qpath) as q:
            wait_for(lambda: q.groups()[f"forward:{picky.url}"].dead == 1, 30, message="the refused message dead-lettered")
            assert [d.seq for d in q.dead_letters(f"forward:{picky.url}")] == [7]
            assert "400" in q.dead_letters(f"forward:{picky.url}")[0].error
            assert q.dead_letters(f"forward:{flaky.url}") == []  # 503s are retried, never dead
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        for r in (healthy, flaky, picky):
            r.close()
    assert all(n == 1 for n in healthy.ok.values())  # a failing neighbour caused no duplicate
    assert flaky.requests >= 23  # its first 3 failed and were retried
    assert healthy.bodies[5] == ("application/json", b"5")


def test_forward_bad_url_is_one_line(qpath):
    StaggerQueue(qpath).close()
    r = subprocess.run(CLI + ["forward", qpath, "--url", "ftp://x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bad URL" in r.stderr


def test_forward_retries_network_errors_until_the_destination_is_up(qpath):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there yet: connections are refused
    with StaggerQueue(qpath) as q:
        q.write_many(["a", "b", "c"])
    url = f"http://127.0.0.1:{port}/in"
    p = subprocess.Popen(CLI + ["forward", qpath, "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    receiver = None
    try:
        with StaggerQueue(qpath) as q:
            wait_for(lambda: f"forward:{url}" in q.groups() and q.groups()[f"forward:{url}"].retrying > 0, 60,
                     message="a refused delivery waiting for its retry")
        receiver = Receiver()
        receiver.close()  # only its handler is reused, on the port forward aims at
        server = ThreadingHTTPServer(("127.0.0.1", port), receiver.server.RequestHandlerClass)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        wait_for(lambda: set(receiver.ok) == {1, 2, 3}, 60, message="all delivered once the destination is up")
        server.shutdown()
        server.server_close()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    with StaggerQueue(qpath) as q:
        assert q.dead_letters(f"forward:{url}") == []


def test_forward_stops_a_destination_whose_group_is_dropped(qpath):
    gone, kept = Receiver(), Receiver()
    with StaggerQueue(qpath) as q:
        q.write_many([1, 2])
    p = subprocess.Popen(CLI + ["forward", qpath, "--url", gone.url, "--url", kept.url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: set(gone.ok) == set(kept.ok) == {1, 2}, 60, message="both served")
        r = subprocess.run(CLI + ["drop-group", qpath, "--group", f"forward:{gone.url}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        with StaggerQueue(qpath) as q:
            q.write(3)
            wait_for(lambda: set(kept.ok) == {1, 2, 3}, 60, message="the other destination goes on")
            assert list(q.groups()) == [f"forward:{kept.url}"]  # the dropped group was not created again
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        for r in (gone, kept):
            r.close()
    assert gone.ok == {1: 1, 2: 1}  # nothing resent, nothing new
    assert "dropped" in p.stderr.read()
