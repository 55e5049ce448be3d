"""The README's first two fenced code blocks are one command each, and .ci/run runs the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_first_two_blocks_are_single_commands():
    blocks = _blocks()
    assert len(blocks) >= 2
    for block in blocks[:2]:
        assert len(block.strip().splitlines()) == 1, block
    assert "nova demo" in blocks[0]
    assert "pytest" in blocks[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = _blocks()[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
