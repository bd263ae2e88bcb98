"""The sans-IO parts of the upstreams: line splitting, SSE, and the two dialects."""

from __future__ import annotations

import pytest

from tokenrelay import (
    Delta,
    ToolCallDelta,
    UnknownEventKind,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamReportedError,
    Usage,
)
from tokenrelay.upstreams._codec import (
    Answer,
    EventKind,
    decode_event,
    encode_delta,
    encode_text,
)
from tokenrelay.upstreams._lines import LineSplitter, SSEParser, SurrogateJoiner
from tokenrelay.upstreams._ollama import OllamaDecoder
from tokenrelay.upstreams._openai import OpenAIDecoder


def test_lines_end_in_lf_crlf_or_cr_even_when_split_across_chunks() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b"a\nb\r") == [b"a"]  # the \r may be the start of \r\n
    assert splitter.feed(b"\nc\rd") == [b"b", b"c"]
    assert splitter.feed(b"\r") == []
    assert splitter.feed(b"e") == [b"d"]
    assert splitter.close() == [b"e"]
    assert splitter.close() == []


def test_empty_lines_are_lines() -> None:
    assert LineSplitter(10).feed(b"\n\r\n\r\n") == [b"", b"", b""]


def test_a_line_over_the_cap_fails_without_waiting_for_its_newline() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"12345678\n") == [b"12345678"]
    splitter.feed(b"1234")
    with pytest.raises(UpstreamProtocolError, match="a line longer than 8 bytes"):
        splitter.feed(b"56789")
    with pytest.raises(UpstreamProtocolError):
        LineSplitter(8).feed(b"123456789\n")


def test_sse_events_comments_and_multiline_data() -> None:
    parser = SSEParser()
    lines = [b": keep-alive", b"", b"event: note", b"data: a", b"data:b", b"id: 3", b""]
    events = [e for e in map(parser.feed_line, lines) if e is not None]
    assert [(e.event, e.data) for e in events] == [("note", "a\nb")]
    assert parser.feed_line(b"data: tail") is None
    tail = parser.close()
    assert tail is not None
    assert (tail.event, tail.data) == ("message", "tail")


def ollama_lines(*objects: str) -> list[Delta]:
    decoder = OllamaDecoder()
    deltas: list[Delta] = []
    for line in objects:
        deltas += decoder.feed(line.encode())
    return deltas


def test_ollama_stream() -> None:
    assert ollama_lines(
        '{"message": {"role": "assistant", "content": "Hel"}, "done": false}',
        "",
        '{"message": {"role": "assistant", "content": "lo"}, "done": false}',
        '{"message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "length",'
        ' "prompt_eval_count": 12, "eval_count": 2}',
    ) == [Delta("Hel"), Delta("lo"), Delta("", "length", Usage(12, 2))]


@pytest.mark.parametrize(
    ("line", "error", "message"),
    [
        ("not json", UpstreamProtocolError, "ollama sent a line that is not JSON: b'not json'"),
        ("[1, 2]", UpstreamProtocolError, "ollama sent a line that is not an object"),
        ('{"error": "model \\"x\\" not found"}', UpstreamReportedError, 'model "x" not found'),
        ('{"message": {"content": 5}}', UpstreamProtocolError, "non-text content"),
    ],
)
def test_ollama_bad_lines(line: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("[", r"\[")):
        ollama_lines(line)


def test_ollama_stream_ending_without_done() -> None:
    decoder = OllamaDecoder()
    decoder.feed(b'{"message": {"content": "a"}, "done": false}')
    with pytest.raises(UpstreamDisconnected, match="without a final 'done' line"):
        decoder.close()


def sse(decoder: OpenAIDecoder, text: str) -> list[Delta]:
    return [d for line in text.split("\n") for d in decoder.feed(line.encode())]


def test_openai_stream_with_usage_after_the_finish_reason() -> None:
    decoder = OpenAIDecoder()
    deltas = sse(
        decoder,
        ': keep-alive\n\ndata: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
        'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
        'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\n'
        'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
        "data: [DONE]\n\n",
    )
    # The role alone and the keep-alive give nothing: they are not the model's output.
    assert deltas == [Delta("Hi"), Delta("", "length"), Delta(usage=Usage(3, 1))]
    assert decoder.finished


def test_openai_stream_ending_after_a_finish_reason_without_done() -> None:
    decoder = OpenAIDecoder()
    line = b'data: {"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]}'
    assert decoder.feed(line) == []  # no blank line yet: the event is not complete
    assert decoder.close() == [Delta("x", "stop")]


def test_openai_stream_ending_unfinished() -> None:
    decoder = OpenAIDecoder()
    sse(decoder, 'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
    with pytest.raises(UpstreamDisconnected, match="before finishing the answer"):
        decoder.close()


@pytest.mark.parametrize(
    ("event", "error", "message"),
    [
        ("data: {oops", UpstreamProtocolError, "an event that is not JSON"),
        ('data: {"error": {"message": "overloaded"}}', UpstreamReportedError, "overloaded"),
        ('event: error\ndata: {"message": "boom"}', UpstreamReportedError, "boom"),
        ('data: {"choices": ["x"]}', UpstreamProtocolError, "malformed choice"),
    ],
)
def test_openai_bad_events(event: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        sse(OpenAIDecoder(), event + "\n\n")


@pytest.mark.parametrize(
    ("pieces", "text"),
    [
        (["Hi ", "\ud83d", "\ude00", "!"], "Hi \U0001f600!"),  # a pair split across pieces
        (["\ud83d\ude00"], "\U0001f600"),  # a pair in one piece, as two code points
        (["a\ud83d", "b"], "a\ufffdb"),  # a high surrogate with no low one after it
        (["a\ude00b"], "a\ufffdb"),  # a lone low surrogate
        (["\ud83d"], "\ufffd"),  # the text ends on a high surrogate
        (["plain ", "ascii"], "plain ascii"),
        (["é", "\U0001f600"], "é\U0001f600"),
    ],
)
def test_text_split_inside_a_surrogate_pair_is_mended(pieces: list[str], text: str) -> None:
    joiner = SurrogateJoiner()
    out = "".join(joiner.feed(piece) for piece in pieces) + joiner.flush()
    assert out == text
    out.encode("utf-8")  # always encodable


def test_events_round_trip_through_the_codec_with_their_kind() -> None:
    usage = Usage(3, 2)
    events = encode_delta(Delta("Hel")) + encode_delta(Delta("lo", "stop", usage))
    assert events == [
        '"Hel"',  # plain text of choice 0: its JSON string, nothing more
        'c{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}',
        'u{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}',
    ]
    decoded = [decode_event(data) for data in events]
    assert [d.kind for d in decoded] == [EventKind.TEXT, EventKind.CHOICE, EventKind.USAGE]
    assert decoded[1].value["delta"] == {"content": "lo"}
    assert decoded[2].value["total_tokens"] == 5
    assert encode_text("a\nb") == '"a\\nb"'  # a text event costs its JSON string, no more


def test_every_part_of_a_step_is_encoded_in_openai_shape_and_gathered_back() -> None:
    logprobs = {"content": [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}]}
    steps = [
        Delta(reasoning="let me think", model="served-name"),
        Delta(tool_calls=(ToolCallDelta(0, id="call_1", name="get", type="function"),)),
        Delta(tool_calls=(ToolCallDelta(0, arguments='{"q":'),)),
        Delta(tool_calls=(ToolCallDelta(0, arguments='"x"}'),)),
        Delta("B", choice=1, logprobs=logprobs, extra={"audio": {"id": "a"}}),
        Delta(finish_reason="tool_calls"),
        Delta(finish_reason="stop", choice=1),
        Delta(usage=Usage(5, 7, {"completion_tokens_details": {"reasoning_tokens": 3}})),
    ]
    events = [data for step in steps for data in encode_delta(step)]
    assert events[1] == (
        'c{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
        '"function":{"name":"get","arguments":""}}]},"finish_reason":null}'
    )
    answer = Answer()
    for data in events:
        answer.add(data)
    assert answer.choices() == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "reasoning_content": "let me think",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get", "arguments": '{"q":"x"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "B", "audio": {"id": "a"}},
            "logprobs": logprobs,
            "finish_reason": "stop",
        },
    ]
    assert answer.usage == {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "total_tokens": 12,
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    assert answer.finished


@pytest.mark.parametrize("data", ['{"finish_reason":"stop"}', "z[1]", ""])
def test_an_event_of_unknown_kind_is_a_clear_error(data: str) -> None:
    with pytest.raises(UnknownEventKind, match=r"^an event of unknown kind "):
        decode_event(data)
