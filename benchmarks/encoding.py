"""The per-token work between an upstream's bytes and a client's write, in one process: an
OpenAI-style SSE chunk (as vLLM sends it) through the line splitter and the decoder, the
delta through the event codec into the run's event, and the event through the chunk
renderer. It times that path, and counts the bytes each event holds in a run's log."""

from __future__ import annotations

import json
import time

from tokenrelay import Event
from tokenrelay.server._sse import ChunkRenderer
from tokenrelay.upstreams._codec import encode_delta
from tokenrelay.upstreams._lines import LineSplitter
from tokenrelay.upstreams._openai import OpenAIDecoder

WORDS = ["the", " model", " answers", " in", " tokens", " of", " a", " few", " bytes", " each"]


def _chunk(text: str) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "llama",
        "choices": [
            {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        ],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def text_path(tokens: int) -> tuple[float, float]:
    """Seconds per token along the whole path, and bytes per event held in the log."""
    chunks = [_chunk(WORDS[i % len(WORDS)]) for i in range(tokens)]
    splitter = LineSplitter(1 << 20)
    decoder = OpenAIDecoder()
    renderer = ChunkRenderer("run", 1, include_usage=False)
    renderer.name("llama", None)
    held = 0
    events = 0
    started = time.perf_counter()
    for seq, chunk in enumerate(chunks):
        for line in splitter.feed(chunk):
            for delta in decoder.feed(line):
                for data in encode_delta(delta):
                    held += len(data)
                    events += 1
                    renderer.events([Event(seq, data, "run")])
    elapsed = time.perf_counter() - started
    return elapsed / tokens, held / events
