"""Helpers shared by the tests."""

import time


def wait_for(condition, timeout=30.0, interval=0.01, message="condition"):
    """Poll ``condition()`` until truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
