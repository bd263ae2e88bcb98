from __future__ import annotations

import logging

import pytest
import trio
from trio.testing import MockClock

import tokenrelay
from _helpers import piped
from tokenrelay._lifecycle import format_fields
from tokenrelay.testing import ScriptedUpstream


def test_values_that_could_forge_a_field_or_a_line_are_quoted() -> None:
    assert format_fields({"session": "plain-id_1.2:3"}) == "session=plain-id_1.2:3"
    assert format_fields({"session": 'a b=c"\nstream_end'}) == ('session="a b=c\\"\\nstream_end"')
    assert format_fields({"reason": None, "n": 3, "t": 0.5}) == "reason=- n=3 t=0.5"
    assert format_fields({"session": ""}) == 'session=""'


async def test_log_lines_read_as_the_reference_troubleshooting_greps_expect(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenrelay")
    async with tokenrelay.open_relay() as relay:
        first = await relay.start("sess abc", piped(ScriptedUpstream(["a"], then="hang")))
        await trio.sleep(0.25)
        second = await relay.start("sess abc", piped(ScriptedUpstream(["b", "c"], interval=0.5)))
        await second.wait_finished()
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenrelay"]
    assert lines == [
        f'stream_start run={first.id} session="sess abc"',
        f'stream_cancelled run={first.id} session="sess abc" reason=superseded',
        f'stream_end run={first.id} session="sess abc" status=stopped reason=superseded '
        "duration_ms=250 events=1",
        f'prev_stream_finished_cleanly run={first.id} session="sess abc" waited_ms=0',
        f'stream_start run={second.id} session="sess abc"',
        f'stream_end run={second.id} session="sess abc" status=done reason=- '
        "duration_ms=500 events=2",
    ]
    # grep -c stream_start == grep -c stream_end
    assert sum("stream_start" in line for line in lines) == sum(
        "stream_end" in line for line in lines
    )
