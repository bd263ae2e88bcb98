"""The README's examples run as pasted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import trio
from trio.testing import MockClock

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_first_screen_shows_install_and_test_commands() -> None:
    first_screen = "\n".join(README.read_text().splitlines()[:15])
    assert "pip install -e '.[test]'" in first_screen
    assert "\npytest " in first_screen


def test_the_embedding_example_runs_as_pasted() -> None:
    example = python_blocks()[0]
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [
        "0 stop ",
        "1 really ",
        "2 stops ",
        "3 the ",
        "4 model ",
        "done None",
    ]


def test_the_testing_example_passes() -> None:
    namespace: dict[str, object] = {}
    [example] = [block for block in python_blocks() if "async def test_" in block]
    exec(example, namespace)
    test = namespace["test_stop_during_prefill_closes_the_upstream_at_once"]
    clock = MockClock(autojump_threshold=0)
    trio.run(test, clock, clock=clock)  # type: ignore[arg-type]
