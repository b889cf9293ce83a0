"""Every code block and command in the README runs, so the README cannot rot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def commands() -> list[str]:
    return [
        line[2:]
        for block in blocks("console")
        for line in block.splitlines()
        if line.startswith("$ ")
    ]


def test_python_blocks_run_in_order():
    """The Python blocks run top to bottom in one namespace, as a reader would paste them."""
    namespace: dict[str, object] = {"__name__": "readme"}
    assert blocks("python"), "the README has no Python block"
    for block in blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith("make ")])
def test_make_commands_are_real_targets(command):
    """make commands: the target exists and its recipe expands (-n), without recursing into it."""
    args = command.split()
    result = subprocess.run(
        [*args[:1], "-n", *args[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_command_is_covered():
    """Each console command is exercised by a test in this module or another named here."""
    known = ("make ",)
    assert all(c.startswith(known) for c in commands()), commands()
