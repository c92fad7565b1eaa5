"""Shared fixtures. Tests use real files under tmp_path and real processes.

The repository root goes first on sys.path and PYTHONPATH, so the tests (and
the processes they start) exercise this checkout's code whether or not the
package is installed.
"""

import os
import sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture
def qpath(tmp_path):
    """Path of a queue file that does not exist yet."""
    return str(tmp_path / "q.db")


def pytest_terminal_summary(terminalreporter):
    """Print the figures the fault-injection tests recorded (tests/faults.py)."""
    from tests.faults import FIGURES

    if FIGURES:
        terminalreporter.section("stagger_sqlite figures")
        for name, values in FIGURES.items():
            terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
