"""Starting benchmark processes at one moment (run.py's W3g and
bench_groups.py race member processes the same way)."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Callable, List, Tuple

CTX = mp.get_context("fork")  # children open their own queues after fork


def start_together(target: Callable[..., None], path: str, processes: int) -> Tuple[List[Any], float]:
    """Start ``processes`` of ``target(path, start, out)``, give them time to
    import and open their queue, then release them at once. Each puts one
    result in ``out``. Returns the results and the ``time.perf_counter()``
    of the release; every process has ended by then."""
    start, out = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=target, args=(path, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let every process import and open
    t0 = time.perf_counter()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return results, t0
