"""The embedded demo model: deterministic, readable text derived from the prompt, streamed
word by word on trio's clock, so the relay runs (and can be tried) with no model server.

It also shows the other kinds of output a real model streams. Asked to reason (a
``reasoning_effort`` other than ``"none"``/``"minimal"``, or "think" in the prompt), it first
streams a short reasoning text. Given ``tools`` and a prompt that names one of them, it calls
that tool, with arguments derived from the prompt; given the tool's result, it answers in text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from .._exceptions import InvalidRequest
from ._chat import ChatRequest, Delta, ToolCallDelta, Usage, message_text
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

# Short on purpose (4 to 8 words): the reasoning must land inside its effort's word range.
_THOUGHTS = (
    "Let me think this through.",
    "What does the user really want here?",
    "A short, clear answer is best.",
    "I have no real knowledge, only the prompt.",
    "Everything I say is derived from the prompt.",
    "Same prompt, same thoughts, same answer.",
    "No model server is needed for this.",
    "The reader sees this reasoning first.",
    "The answer follows at the same pace.",
    "Stopping now would keep what I thought so far.",
    "I should stay friendly and to the point.",
    "Nothing here needs a second look.",
)
# The reasoning's length in words, by ``reasoning_effort``; other efforts count as medium.
_EFFORT_WORDS = {
    "none": (15, 20),
    "minimal": (15, 20),
    "low": (15, 20),
    "medium": (24, 30),
    "high": (34, 40),
    "xhigh": (34, 40),
}
_MEDIUM = _EFFORT_WORDS["medium"]
_NO_REASONING = frozenset({"none", "minimal"})
_THINK = re.compile(r"(?<!\w)think(?!\w)", re.IGNORECASE)

_QUOTED = re.compile(r'"([^"\n]+)"|\u201c([^\u201d\n]+)\u201d')  # "..." or “...”
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,15}(?:\.\d{1,15})?")
_EDGES = " \t.,;:!?\"'()[]{}\u201c\u201d\u2018\u2019"
_FILLER = frozenset(
    {"", "a", "an", "the", "for", "about", "on", "in", "at", "of", "to", "with", "using"}
    | {"tool", "function", "please", "call", "use", "-"}
)
_SKIP = object()  # "no value for this property"

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


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


def demo_reasoning(prompt: str, plan: str, effort: str | None = None) -> str:
    """The demo model's reasoning before it answers ``prompt``: always the same for the same
    arguments. It quotes the prompt, states ``plan`` (one short sentence), and adds thoughts up
    to 15-20 words for a ``"low"`` ``effort``, 24-30 for ``"medium"`` (or ``None``, or an effort
    it does not know) and 34-40 for ``"high"``."""
    prompt = mend_surrogates(prompt)
    low, high = _EFFORT_WORDS.get((effort or "medium").lower(), _MEDIUM)
    words = prompt.split()
    quoted = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
    parts = [f'The user asks: "{quoted}".' if quoted else "The user says nothing.", plan]
    count = sum(len(part.split()) for part in parts)
    rng = random.Random(zlib.crc32(b"think:" + prompt.encode("utf-8")))
    target = rng.randint(low, high)
    for thought in rng.sample(_THOUGHTS, k=len(_THOUGHTS)):
        if count >= target:
            break
        size = len(thought.split())
        if count + size <= high:
            parts.append(thought)
            count += size
    return " ".join(parts)


def demo_arguments(prompt: str, name: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments the demo model calls tool ``name`` with, given the prompt and the tool's
    ``parameters`` (a JSON schema): for each property, a ``"string"`` gets the prompt's quoted
    text, else the words after the tool's name, else the prompt's first words; an
    ``"integer"`` or ``"number"`` the prompt's first number, else 1; a ``"boolean"`` true; an
    ``enum`` its first value. Other properties are left out, or null if required."""
    properties = parameters.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    required = parameters.get("required")
    needed = {key for key in required if isinstance(key, str)} if isinstance(required, list) else ()
    arguments: dict[str, Any] = {}
    for key, schema in properties.items():
        if not isinstance(key, str):
            continue
        value = _value(prompt, name, schema if isinstance(schema, Mapping) else {})
        if value is not _SKIP:
            arguments[key] = value
        elif key in needed:
            arguments[key] = None
    return arguments


def _value(prompt: str, name: str, schema: Mapping[str, Any]) -> object:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return _phrase(prompt, name)
    if kind in ("integer", "number"):
        found = _NUMBER.search(prompt)
        if found is None:
            return 1
        number = found.group()
        if kind == "integer":
            return int(number.partition(".")[0])
        return float(number) if "." in number else int(number)
    if kind == "boolean":
        return True
    return _SKIP


def _phrase(prompt: str, name: str) -> str:
    quoted = _QUOTED.search(prompt)
    if quoted is not None and (phrase := (quoted.group(1) or quoted.group(2)).strip()):
        return phrase
    mention = _mention(name, prompt)
    if mention is not None:
        after = itertools.dropwhile(
            lambda word: word.lower().strip(_EDGES) in _FILLER, prompt[mention.end() :].split()
        )
        words: list[str] = []
        for word in itertools.islice(after, 8):  # up to the end of the clause
            words.append(word)
            if word.endswith((".", ",", ";", "!", "?")):
                break
        if phrase := " ".join(words).strip(_EDGES):
            return phrase
    return " ".join(prompt.split()[:12])


def _mention(name: str, prompt: str) -> re.Match[str] | None:
    """Where ``prompt`` names ``name``, as a whole word, in any case."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", prompt, re.IGNORECASE)


def _function_tools(request: ChatRequest) -> dict[str, Mapping[str, Any]]:
    """The request's function tools: their names and parameter schemas, in order."""
    tools: dict[str, Mapping[str, Any]] = {}
    for tool in request.tools or ():
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
            continue
        name = function.get("name")
        if isinstance(name, str) and name.strip() and name not in tools:
            parameters = function.get("parameters")
            tools[name] = parameters if isinstance(parameters, Mapping) else {}
    return tools


def _chosen_tool(request: ChatRequest, prompt: str) -> str | None:
    """The tool the demo calls: the one ``tool_choice`` forces, else the first the prompt
    names (the longest name, if two start at the same place), else, if ``tool_choice`` is
    ``"required"``, the first tool; never one if ``tool_choice`` is ``"none"``."""
    tools = _function_tools(request)
    choice = request.body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, Mapping):
        function = choice.get("function")
        forced = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(forced, str) and forced in tools:
            return forced
    named = [
        (found.start(), -len(name), i, name)
        for i, name in enumerate(tools)
        if (found := _mention(name, prompt)) is not None
    ]
    if named:
        return min(named)[3]
    return next(iter(tools)) if choice == "required" else None


def _tool_call(prompt: str, name: str, parameters: Mapping[str, Any]) -> list[Delta]:
    """A call of tool ``name`` as OpenAI streams it: its id, type and name, then its arguments'
    JSON text in 3 to 6 fragments (fewer if the text is shorter)."""
    arguments = _compact(demo_arguments(prompt, name, parameters))
    rng = random.Random(zlib.crc32(f"{name}\0{prompt}".encode()))
    pieces = min(rng.randint(3, 6), len(arguments))
    cuts = sorted(rng.sample(range(1, len(arguments)), pieces - 1))
    call_id = "call_" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:24]
    head = ToolCallDelta(0, id=call_id, name=name, type="function")
    return [Delta(tool_calls=(head,))] + [
        Delta(tool_calls=(ToolCallDelta(0, arguments=arguments[start:end]),))
        for start, end in itertools.pairwise([0, *cuts, len(arguments)])
    ]


def _tool_result(message: Mapping[str, Any]) -> str:
    """The opening of the answer to a tool's result: its first 12 words."""
    words = mend_surrogates(message_text(message)).split()
    if not words:
        return "The tool returned nothing."
    said = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    return f"The tool returned: {said}" + ("" if said.endswith((".", "!", "?")) else ".")


def demo_deltas(request: ChatRequest, *, max_tokens: int = 256, model: str = "demo") -> list[Delta]:
    """Every delta of the demo model's answer to ``request``, one per step: the reasoning if
    asked for, word by word; then a tool call or the text, word by word; and the finish.

    ``max_tokens`` (the request's own, if it has one) bounds the steps, reasoning included;
    usage counts them. Only choice 0 is answered, whatever the request's ``n``.
    """
    prompt = mend_surrogates(request.prompt_text())
    last = request.messages[-1]
    answered = last.get("role") == "tool"
    tool = None if answered else _chosen_tool(request, prompt)
    answer: list[Delta]
    if tool is not None:
        answer = _tool_call(prompt, tool, _function_tools(request)[tool])
        plan = f"I should call {tool}."
    else:
        text = demo_answer(prompt)
        if answered:
            text = f"{_tool_result(last)} {text}"
        answer = [Delta(word) for word in _WORD.findall(text)]
        plan = (
            "I will report the tool's result."
            if answered
            else f"I will answer in {len(answer)} words."
        )
    effort = request.reasoning_effort
    steps: list[Delta] = []
    if (effort is not None and effort.lower() not in _NO_REASONING) or _THINK.search(prompt):
        thoughts = demo_reasoning(prompt, plan, effort)
        steps = [Delta(reasoning=word) for word in _WORD.findall(thoughts)]
    steps += answer
    limit = request.max_tokens if request.max_tokens is not None else max_tokens
    kept = steps[:limit]
    finish = "tool_calls" if tool is not None else "stop"
    if len(steps) > limit:
        finish = "length"
    usage = Usage(_prompt_tokens(request), len(kept))
    if kept and finish != "tool_calls":
        deltas = [*kept[:-1], kept[-1]._replace(finish_reason=finish, usage=usage)]
    else:  # OpenAI ends a tool call with a step of its own
        deltas = [*kept, Delta(finish_reason=finish, usage=usage)]
    deltas[0] = deltas[0]._replace(model=model)
    return deltas


def _prompt_tokens(request: ChatRequest) -> int:
    """The request's size as the demo model counts it: the words of all its messages."""
    return sum(len(message_text(m).split()) for m in request.messages)


class DemoUpstream:
    """A stand-in model. It waits ``prefill`` seconds before the first word and
    ``token_delay`` seconds before each later one (cancellable at every wait, like a real
    upstream), honours ``max_tokens`` (default 256), and reports usage in words.

    Asked to reason (a ``reasoning_effort`` other than ``"none"`` or ``"minimal"``, or "think"
    as a word of the prompt), it first streams a short reasoning, at the same pace. Given
    ``tools`` and a prompt that names one, it calls it instead of answering in text; given the
    tool's result (a last message of role ``tool``), it answers in text. It answers choice 0
    only, whatever the request's ``n``.
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

    async def models(self) -> list[dict[str, Any]]:
        """The one model the demo serves, under its name."""
        await trio.lowlevel.checkpoint()
        return [{"id": self.model, "object": "model", "created": 0, "owned_by": "tokenrelay"}]

    def stream(self, request: ChatRequest) -> DemoStream:
        """The demo answer to ``request``'s last user message, step by step: reasoning if
        asked for, then a tool call or the text, word by word; see :func:`demo_deltas`.
        Raises :class:`InvalidRequest` for ``n`` > 1: the demo gives one choice."""
        if request.n > 1:
            raise InvalidRequest("the demo model gives one choice: 'n' must be 1")
        deltas = demo_deltas(request, max_tokens=self.max_tokens, model=self.model)
        return DemoStream(deltas, self.prefill, self.token_delay)


class DemoStream:
    """The demo model's answer to one request, as deltas: ``prefill`` seconds before the
    first one, ``delay`` seconds before each later one."""

    def __init__(self, deltas: Sequence[Delta], prefill: float, delay: float) -> None:
        self._deltas = deltas
        self._prefill = prefill
        self._delay = delay
        self._sent = 0
        self._done = False

    def __aiter__(self) -> DemoStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done or self._sent >= len(self._deltas):
            raise StopAsyncIteration
        await trio.sleep(self._prefill if self._sent == 0 else self._delay)
        delta = self._deltas[self._sent]
        self._sent += 1
        return delta

    async def aclose(self) -> None:
        """Stop the answer here: later steps are never sent."""
        self._done = True
        await trio.lowlevel.checkpoint()
