from __future__ import annotations

import re
from typing import Any

import pytest

import tokenrelay
from tokenrelay import ChatRequest, InvalidRequest, UpstreamSpec, parse_upstream


def test_a_full_request() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
            },
        ],
        "stream": True,
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 1,
        "stop": "\n",
        "seed": 7,
        "logit_bias": {"1": 2},
    }
    request = ChatRequest.from_openai(body)
    assert (request.model, request.stream, request.max_tokens) == ("m", True, 5)
    assert (request.temperature, request.top_p, request.stop, request.seed) == (0.5, 1.0, ["\n"], 7)
    assert request.prompt_text() == "hi there"
    assert request.body["logit_bias"] == {"1": 2}


def test_max_completion_tokens_wins() -> None:
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 5,
        "max_completion_tokens": 9,
    }
    assert ChatRequest.from_openai(body).max_tokens == 9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the request body must be a JSON object"),
        ({}, "'messages' must be a non-empty array of messages"),
        ({"messages": []}, "'messages' must be a non-empty array of messages"),
        ({"messages": ["hi"]}, "'messages[0]' must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "'messages[0].role' must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "'messages[0].content' must be a string"),
        ({"messages": [{"role": "user", "content": "x"}], "model": 1}, "'model' must be a string"),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "'stream' must be true",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "'max_tokens' must be a positive",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": True},
            "'max_tokens' must be a positive",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "'temperature' must be a number",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "'temperature' must be between 0 and 2",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stop": [1]},
            "'stop' must be a string or an array",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "seed": 1.5},
            "'seed' must be an integer",
        ),
    ],
)
def test_invalid_requests_say_which_field(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        ChatRequest.from_openai(body)
    assert issubclass(InvalidRequest, ValueError)


def test_an_assistant_turn_with_only_tool_calls_is_fine() -> None:
    ChatRequest.from_openai(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    )


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("demo", UpstreamSpec("demo")),
        (" Demo ", UpstreamSpec("demo")),
        ("ollama=http://gpu-box:11434/", UpstreamSpec("ollama", "http://gpu-box:11434")),
        ("openai=http://localhost:8000/v1", UpstreamSpec("openai", "http://localhost:8000/v1")),
        ("openai=https://api.openai.com/v1", UpstreamSpec("openai", "https://api.openai.com/v1")),
    ],
)
def test_upstream_specs(spec: str, parsed: UpstreamSpec) -> None:
    assert parse_upstream(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "vllm=http://x",
            "unknown upstream 'vllm=http://x': use 'demo', 'ollama=http://HOST:11434'",
        ),
        ("ollama", "the ollama upstream needs a URL, e.g. 'ollama=http://localhost:11434'"),
        ("openai=", "the openai upstream needs a URL, e.g. 'openai=http://localhost:8000/v1'"),
        ("demo=http://x", "the demo upstream takes no URL"),
        ("ollama=localhost:11434", "bad ollama upstream URL 'localhost:11434'"),
        ("openai=ftp://x/v1", "bad openai upstream URL 'ftp://x/v1'"),
    ],
)
def test_bad_upstream_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_upstream(spec)


def test_ollama_payload_maps_openai_fields() -> None:
    request = ChatRequest.from_openai(
        {
            "model": "llama3.2",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
            "max_tokens": 9,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": ["END"],
            "seed": 1,
        }
    )
    upstream = tokenrelay.OllamaUpstream("http://x:11434/", client=None)  # type: ignore[arg-type]
    assert upstream.payload(request) == {
        "model": "llama3.2",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "stream": True,
        "options": {"temperature": 0.2, "top_p": 0.9, "num_predict": 9, "stop": ["END"], "seed": 1},
    }
    with pytest.raises(InvalidRequest, match="no model"):
        upstream.payload(ChatRequest.from_openai({"messages": [{"role": "user", "content": "x"}]}))


def test_openai_payload_passes_unknown_fields_through() -> None:
    request = ChatRequest.from_openai(
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "n": 1}
    )
    upstream = tokenrelay.OpenAIUpstream("http://x/v1", client=None, model="m")  # type: ignore[arg-type]
    assert upstream.payload(request) == {
        "messages": [{"role": "user", "content": "x"}],
        "logprobs": True,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},  # always asked for upstream
        "model": "m",
    }


def test_openai_payload_keeps_the_clients_stream_options_and_drops_an_empty_model() -> None:
    request = ChatRequest.from_openai(
        {
            "messages": [{"role": "user", "content": "x"}],
            "model": "",
            "stream_options": {"include_usage": False, "other": 1},
        }
    )
    assert not request.include_usage
    upstream = tokenrelay.OpenAIUpstream("http://x/v1", client=None)  # type: ignore[arg-type]
    assert upstream.payload(request) == {
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True, "other": 1},
    }
