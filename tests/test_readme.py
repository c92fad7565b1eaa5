"""The README's examples of the core sections work when pasted, and the demo
its first command runs succeeds."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")

#: The README sections of issue 2 (the other sections are tested by their owners).
CORE_SECTIONS = ["Quickstart", "The API", "Durability: what each mode can lose", "Architecture", "Errors"]


def sections(text):
    """{title: body} for the top-level sections (titles underlined with ===)."""
    lines = text.splitlines()
    found, title, body = {}, None, []
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"=+", lines[i + 1]) and line.strip() and not re.fullmatch(r"=+", line):
            if title is not None:
                found[title] = "\n".join(body)
            title, body = line.strip(), []
        elif title is not None and not re.fullmatch(r"=+", line):
            body.append(line)
    if title is not None:
        found[title] = "\n".join(body)
    return found


def python_blocks(body):
    """The contents of the ``.. code-block:: python`` directives, dedented."""
    blocks = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: python":
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            blocks.append("\n".join(block).strip() + "\n")
        else:
            i += 1
    return blocks


def test_every_core_section_is_written():
    with open(README) as f:
        text = f.read()
    found = sections(text)
    for title in CORE_SECTIONS:
        assert title in found, title
        assert "(issue 2)" not in found[title], f"{title}: marker left"
        assert len(found[title].strip()) > 200, title
    assert "16 MB" in found["The API"]  # the stated disk bound (tests/test_space.py)


def _core_examples():
    with open(README) as f:
        found = sections(f.read())
    return [(title, block) for title in CORE_SECTIONS for block in python_blocks(found.get(title, ""))]


@pytest.mark.parametrize("title", [t for t in CORE_SECTIONS if t in ("Quickstart", "The API", "Errors")])
def test_the_examples_of_a_section_run_as_pasted(tmp_path, title):
    blocks = [b for t, b in _core_examples() if t == title]
    assert blocks, title
    for n, block in enumerate(blocks):
        script = tmp_path / f"example{n}.py"
        script.write_text(block)
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{title} example {n} failed:\n{block}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr


def test_the_demo_runs_and_finds_nothing_lost(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--messages", "60"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: nothing lost, nothing duplicated" in proc.stdout
    assert "every message exactly once" in proc.stdout
