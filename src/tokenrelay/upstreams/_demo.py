"""The embedded demo model: deterministic, readable text derived from the prompt, streamed
word by word on trio's clock, so the relay runs (and can be tried) with no model server."""

from __future__ import annotations

import random
import re
import zlib

import trio

from ._chat import ChatRequest, Delta, Usage, message_text
from ._lines import mend_surrogates

__all__ = ["DemoStream", "DemoUpstream"]

_SENTENCES = (
    "This answer comes from tokenrelay's built-in demo model, which needs no model server.",
    "It streams one word at a time at a steady pace, so you can watch the relay at work.",
    "Press stop halfway through and the stream ends at once, with the partial answer kept.",
    "Send another prompt before this one is done, and the new run supersedes the old one.",
    "Close the page and come back later: the run kept going, and resuming replays what you missed.",
    "Every run has an id and every event a sequence number, so nothing is lost or repeated.",
    "Point the relay at Ollama or at any OpenAI-compatible server to get real answers.",
    "One timeout guards the wait for the first token, another the gaps between tokens.",
    "A reader that falls behind never slows the model down; it catches up from the log.",
    "Finished runs are kept for a grace period, so a late reader can still replay them.",
    "When the grace period is over, the run and its events are freed.",
    "Two producers never run at once in one session: the second waits for the first to end.",
    "Stopping a run closes its connection to the model server, so generation stops too.",
    "The demo text is derived from your prompt, so the same prompt gives the same answer.",
)
_WORD = re.compile(r"\s*\S+")


_LENGTH = re.compile(r"\b(\d{1,5})\s*(?:words|tokens)\b", re.IGNORECASE)


def demo_answer(prompt: str) -> str:
    """The demo model's full answer to ``prompt``: always the same for the same prompt.
    About 40 to 120 words, or as many as the prompt asks for ("write 500 words")."""
    prompt = mend_surrogates(prompt)
    words = prompt.split()
    quoted = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    rng = random.Random(zlib.crc32(prompt.encode("utf-8")))
    asked = _LENGTH.search(prompt)
    target = min(int(asked.group(1)), 10_000) if asked else rng.randint(40, 120)
    parts = [f'You said: "{quoted}".' if quoted else "You said nothing at all."]
    count = len(parts[0].split())
    while count < target:
        for sentence in rng.sample(_SENTENCES, k=len(_SENTENCES)):
            parts.append(sentence)
            count += len(sentence.split())
            if count >= target:
                break
    return " ".join(parts)


class DemoUpstream:
    """A stand-in model. It waits ``prefill`` seconds before the first word and
    ``token_delay`` seconds before each later one (cancellable at every wait, like a real
    upstream), honours ``max_tokens`` (default 256), and reports usage in words.
    """

    name = "demo"

    def __init__(
        self,
        *,
        prefill: float = 0.3,
        token_delay: float = 0.02,
        max_tokens: int = 256,
        model: str = "demo",
    ) -> None:
        if prefill < 0 or token_delay < 0:
            raise ValueError("the demo model's delays must be >= 0 seconds")
        self.prefill = prefill
        self.token_delay = token_delay
        self.max_tokens = max_tokens
        self.model = model

    def __str__(self) -> str:
        return (
            f"the embedded demo model (prefill {self.prefill:g} s, "
            f"{self.token_delay:g} s per token)"
        )

    def stream(self, request: ChatRequest) -> DemoStream:
        """The demo answer to ``request``'s last user message, word by word."""
        words = _WORD.findall(demo_answer(request.prompt_text()))
        limit = request.max_tokens if request.max_tokens is not None else self.max_tokens
        prompt_tokens = sum(len(message_text(m).split()) for m in request.messages)
        return DemoStream(words, limit, prompt_tokens, self.prefill, self.token_delay)


class DemoStream:
    """The demo model's answer to one request, as deltas."""

    def __init__(
        self, words: list[str], limit: int, prompt_tokens: int, prefill: float, delay: float
    ) -> None:
        self._words = words[:limit]
        self._finish = "length" if len(words) > limit else "stop"
        self._prompt_tokens = prompt_tokens
        self._prefill = prefill
        self._delay = delay
        self._sent = 0
        self._done = False

    def __aiter__(self) -> DemoStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        await trio.sleep(self._prefill if self._sent == 0 else self._delay)
        if self._sent < len(self._words):
            word = self._words[self._sent]
            self._sent += 1
            if self._sent < len(self._words):
                return Delta(word)
        else:
            word = ""
        self._done = True
        return Delta(word, self._finish, Usage(self._prompt_tokens, self._sent))

    async def aclose(self) -> None:
        self._done = True
        await trio.lowlevel.checkpoint()
