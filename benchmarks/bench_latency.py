"""Live consumption: how fast a waiting consumer wakes, and what waiting costs.

Run: ``python benchmarks/bench_latency.py [--quick]``. Prints each workload
and its figures; ``main(quick=False)`` returns them as a dict (used by
``benchmarks/run.py``).

1. latency   -- a producer process writes at 500 writes/s (durability "full"),
                a consumer process waits with ``wait=True``; write-to-delivery
                latency, from the moment ``write()`` returned in the producer
                to the moment ``next()`` returned in the consumer (both read
                CLOCK_MONOTONIC, one clock for the whole machine). Also from
                the moment ``write()`` was called (includes the commit).
2. idle_cpu  -- CPU (utime+stime from /proc/<pid>/stat) of a consumer process
                waiting with ``wait=True`` on a queue nobody writes.
3. producer  -- a producer writing as fast as it can, alone, then with N
                consumer processes waiting: (a) "idle": waiting on another
                queue file of the same directory (they have nothing to do; what
                their mere presence costs); (b) "following": waiting on the
                producer's own queue, so every commit wakes them all and they
                read what was written (the worst case, not idle). Rounds
                alternate the consumers SIGSTOPped / running for (a) (slowdown
                = running vs stopped, so machine drift cancels) and are
                compared with alone rounds before and after for (b); the producer's
                own CPU per write (time.process_time) is less noisy than its
                rate, which fsync dominates.
4. schedule  -- a consumer process waits; messages are scheduled 0.3 s ahead,
                nothing else is written; how late after its due time each is
                delivered.
``--producer`` runs workload 3 alone.

5. the same latency workload with the pure-poll fallback
   (``STAGGER_SQLITE_WAKEUP=poll``), the alternative to inotify.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stagger_sqlite import StaggerQueue  # noqa: E402
from stagger_sqlite import wakeup  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# A consumer that records when each message reached it and prints the
# messages' timestamps and its own at the end ("stop" ends it).
CONSUMER = """
import json, sys, time
from stagger_sqlite import StaggerQueue
q = StaggerQueue(sys.argv[1])
print("ready", flush=True)
out = []
for seq, msg in q.consume(wait=True):
    now = time.monotonic()
    if msg == "stop":
        break
    out.append([seq, now, time.time()])
print(json.dumps(out), flush=True)
"""

# Waits with wait=True, prints "ready", until killed.
IDLE = """
import sys
from stagger_sqlite import StaggerQueue
q = StaggerQueue(sys.argv[1])
c = q.consume(wait=True)
print("ready", flush=True)
for _ in c:
    pass
"""


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _spawn(code: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != "ready":
        raise RuntimeError(f"helper failed: {line}{p.stderr.read()}")  # type: ignore[union-attr]


def _pct(values: List[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def latency(tmp: str, seconds: float, rate: int = 500, **env: str) -> Dict[str, Any]:
    path = os.path.join(tmp, f"lat-{time.monotonic_ns()}.db")
    q = StaggerQueue(path)
    consumer = _spawn(CONSUMER, path, **env)
    _ready(consumer)
    time.sleep(0.3)  # let it reach its wait
    called, returned = {}, {}
    interval = 1.0 / rate
    count = int(seconds * rate)
    next_at = time.monotonic()
    for _ in range(count):
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        t0 = time.monotonic()
        seq = q.write(b"x" * 100)
        returned[seq] = time.monotonic()
        called[seq] = t0
    q.write("stop")
    out, err = consumer.communicate(timeout=120)
    q.close()
    got = json.loads(out)
    from_return = [(at - returned[seq]) * 1000 for seq, at, _ in got]
    from_call = [(at - called[seq]) * 1000 for seq, at, _ in got]
    return {
        "writes": count,
        "rate_per_s": rate,
        "delivered": len(got),
        "p50_ms": round(_pct(from_return, 50), 3),
        "p99_ms": round(_pct(from_return, 99), 3),
        "max_ms": round(max(from_return), 3),
        "from_call_p50_ms": round(_pct(from_call, 50), 3),
        "from_call_p99_ms": round(_pct(from_call, 99), 3),
    }


def idle_cpu(tmp: str, seconds: float, **env: str) -> Dict[str, Any]:
    path = os.path.join(tmp, f"idle-{time.monotonic_ns()}.db")
    StaggerQueue(path).close()
    p = _spawn(IDLE, path, **env)
    _ready(p)
    time.sleep(0.5)
    before, t0 = _cpu_seconds(p.pid), time.monotonic()
    time.sleep(seconds)
    used, elapsed = _cpu_seconds(p.pid) - before, time.monotonic() - t0
    p.kill()
    p.wait()
    return {"seconds": round(elapsed, 1), "cpu_s": round(used, 3),
            "percent_of_core": round(100 * used / elapsed, 3),
            "clock_tick_s": round(1 / CLK_TCK, 3)}


def _write_round(path: str, count: int) -> tuple:
    """(writes/s, producer CPU µs per write) of ``count`` writes."""
    with StaggerQueue(path) as q:
        q.write(b"warm")
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            q.write(b"x" * 100)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return count / wall, cpu / count * 1e6


def _signal_all(procs: List[subprocess.Popen], sig: int) -> None:
    for p in procs:
        os.kill(p.pid, sig)


def producer_slowdown(tmp: str, consumers: int, writes: int, rounds: int) -> Dict[str, Any]:
    """Rounds alternate between the consumers stopped (SIGSTOP: they exist
    but cannot run) and running, so the drift of a shared machine hits both
    sides alike; medians of the rounds are reported."""
    import signal

    own = os.path.join(tmp, f"prod-{time.monotonic_ns()}.db")
    other = os.path.join(tmp, f"other-{time.monotonic_ns()}.db")
    StaggerQueue(own).close()
    StaggerQueue(other).close()
    result: Dict[str, Any] = {"consumers": consumers, "writes": writes, "rounds": rounds}
    alone = [_write_round(own, writes) for _ in range(rounds)]
    result["alone_writes_per_s"] = round(statistics.median(r for r, _ in alone))
    result["alone_cpu_us_per_write"] = round(statistics.median(c for _, c in alone), 1)
    for name, target in (("idle", other), ("following", own)):
        procs = [_spawn(IDLE, target) for _ in range(consumers)]
        for p in procs:
            _ready(p)
        time.sleep(1.0)
        stopped, running = [], []
        cpu0, wall0, spent = sum(_cpu_seconds(p.pid) for p in procs), time.monotonic(), 0.0
        for _ in range(rounds):
            if name == "idle":
                _signal_all(procs, signal.SIGSTOP)
                stopped.append(_write_round(own, writes))
                _signal_all(procs, signal.SIGCONT)
                time.sleep(0.3)
            t0 = time.monotonic()
            running.append(_write_round(own, writes))
            spent += time.monotonic() - t0
        # CPU the consumers burnt, per second they were running (stopped
        # rounds use none), as a share of one core.
        used = sum(_cpu_seconds(p.pid) for p in procs) - cpu0
        running_s = spent if name == "idle" else time.monotonic() - wall0
        result[f"{name}_consumers_cpu_percent_of_core"] = round(100 * used / running_s, 2)
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        if name == "following":
            # A consumer stopped mid-read would pin the WAL: no fair baseline
            # there, so alone rounds right after serve instead.
            stopped = [_write_round(own, writes) for _ in range(rounds)] + alone
        base = statistics.median(r for r, _ in stopped)
        rate = statistics.median(r for r, _ in running)
        result[f"{name}_baseline_writes_per_s"] = round(base)
        result[f"{name}_writes_per_s"] = round(rate)
        result[f"{name}_slowdown_percent"] = round(100 * (1 - rate / base), 1)
        result[f"{name}_baseline_cpu_us_per_write"] = round(statistics.median(c for _, c in stopped), 1)
        result[f"{name}_cpu_us_per_write"] = round(statistics.median(c for _, c in running), 1)
    return result


def schedule_lateness(tmp: str, count: int) -> Dict[str, Any]:
    path = os.path.join(tmp, f"sched-{time.monotonic_ns()}.db")
    q = StaggerQueue(path)
    consumer = _spawn(CONSUMER, path)
    _ready(consumer)
    time.sleep(0.3)
    due = {}
    start = time.time() + 0.3
    for i in range(count):
        at = start + i * 0.1
        due[q.schedule(i, at=at)] = at
    time.sleep(start + count * 0.1 - time.time() + 0.2)
    q.write("stop")
    out, _ = consumer.communicate(timeout=120)
    q.close()
    got = json.loads(out)
    late = [(wall - (start + i * 0.1)) * 1000 for i, (_seq, _mono, wall) in enumerate(got)]
    return {"scheduled": count, "delivered": len(got),
            "late_p50_ms": round(_pct(late, 50), 2), "late_max_ms": round(max(late), 2)}


def main(quick: bool = False, only: str = "") -> Dict[str, Any]:
    """Run every workload (shorter with ``quick``) and return the figures."""
    results: Dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}, {platform.system()} {platform.release()}",
        "mechanism": wakeup.mechanism(),
    }
    with tempfile.TemporaryDirectory(prefix="stagger-bench-latency-") as tmp:
        if only == "producer":
            results["producer"] = producer_slowdown(tmp, 20 if quick else 100, 300 if quick else 1000, 3 if quick else 5)
            return results
        results["latency"] = latency(tmp, 2.0 if quick else 10.0)
        results["idle_cpu"] = idle_cpu(tmp, 3.0 if quick else 20.0)
        results["producer"] = producer_slowdown(tmp, 20 if quick else 100, 300 if quick else 1000, 3 if quick else 5)
        results["schedule"] = schedule_lateness(tmp, 5 if quick else 20)
        results["poll_fallback_latency"] = latency(tmp, 1.0 if quick else 4.0, STAGGER_SQLITE_WAKEUP="poll")
        results["poll_fallback_idle_cpu"] = idle_cpu(tmp, 3.0 if quick else 10.0, STAGGER_SQLITE_WAKEUP="poll")
    return results


def _print(results: Dict[str, Any]) -> None:
    print(f"machine: {results['machine']}; wake-up mechanism: {results['mechanism']}")
    if "latency" not in results:
        return _print_producer(results["producer"])
    lat = results["latency"]
    print(f"latency  producer process -> waiting consumer process, {lat['writes']} writes of 100 bytes "
          f"at {lat['rate_per_s']}/s, durability=full:")
    print(f"         from write() returned: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; "
          f"from write() called: p50 {lat['from_call_p50_ms']} ms, p99 {lat['from_call_p99_ms']} ms")
    cpu = results["idle_cpu"]
    print(f"idle     consumer waiting (wait=True) on a queue nobody writes, {cpu['seconds']} s: "
          f"{cpu['cpu_s']} s CPU = {cpu['percent_of_core']} % of a core (clock tick {cpu['clock_tick_s']} s)")
    _print_producer(results["producer"])
    _print_rest(results)


def _print_producer(pr: Dict[str, Any]) -> None:
    print(f"producer {pr['writes']} writes as fast as it can, durability=full, medians of {pr['rounds']} rounds; "
          f"alone: {pr['alone_writes_per_s']}/s, {pr['alone_cpu_us_per_write']} µs CPU/write")
    for name, what, base in (
        ("idle", "idle: waiting on another queue file of the directory", "same processes SIGSTOPped"),
        ("following", "following this queue: woken by every commit, reading it", "alone, before and after"),
    ):
        print(f"         {pr['consumers']} consumer processes {what}: {pr[name + '_writes_per_s']}/s, "
              f"{pr[name + '_cpu_us_per_write']} µs CPU/write; {base}: "
              f"{pr[name + '_baseline_writes_per_s']}/s, {pr[name + '_baseline_cpu_us_per_write']} µs CPU/write; "
              f"slowdown {pr[name + '_slowdown_percent']} %; the consumers together used "
              f"{pr[name + '_consumers_cpu_percent_of_core']} % of a core")


def _print_rest(results: Dict[str, Any]) -> None:
    sc = results["schedule"]
    print(f"schedule {sc['scheduled']} messages due 0.1 s apart, a consumer process waiting, no other writes: "
          f"late by p50 {sc['late_p50_ms']} ms, max {sc['late_max_ms']} ms")
    pl, pc = results["poll_fallback_latency"], results["poll_fallback_idle_cpu"]
    print(f"poll fallback (STAGGER_SQLITE_WAKEUP=poll): latency p50 {pl['p50_ms']} ms, p99 {pl['p99_ms']} ms, "
          f"max {pl['max_ms']} ms; idle CPU {pc['percent_of_core']} % of a core")


if __name__ == "__main__":
    _print(main(quick="--quick" in sys.argv[1:], only="producer" if "--producer" in sys.argv[1:] else ""))
