"""Sans-IO pieces for reading model servers' streams: a line splitter with a length cap, an
SSE (server-sent events) parser, and a mender of text split inside a surrogate pair. They take
bytes or text and return values; the HTTP layer feeds them."""

from __future__ import annotations

import re

from .._exceptions import UpstreamProtocolError

__all__ = ["LineSplitter", "SSEEvent", "SSEParser", "SurrogateJoiner", "mend_surrogates"]


class LineSplitter:
    """Splits a byte stream into lines ending in ``\\n``, ``\\r\\n`` or ``\\r`` (SSE allows all
    three; NDJSON uses ``\\n``). A line longer than ``max_line`` bytes raises
    :exc:`UpstreamProtocolError` as soon as it gets that long, newline or not."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every line they complete (without its line ending)."""
        buffer = self._buffer
        buffer += data
        lines: list[bytes] = []
        start = 0
        end = len(buffer)
        while start < end:
            newline = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, newline if newline >= 0 else end)
            if cr >= 0:
                if cr + 1 == end:
                    break  # a "\r" at the end may be the first half of "\r\n"
                stop, skip = cr, 2 if buffer[cr + 1] == 0x0A else 1
            elif newline >= 0:
                stop, skip = newline, 1
            else:
                break
            if stop - start > self._max_line:
                self._too_long()
            lines.append(bytes(buffer[start:stop]))
            start = stop + skip
        del buffer[:start]
        if len(buffer) > self._max_line:
            self._too_long()
        return lines

    def close(self) -> list[bytes]:
        """The stream ended: the unterminated last line, if any."""
        rest = bytes(self._buffer.rstrip(b"\r"))
        self._buffer.clear()
        return [rest] if rest else []

    def _too_long(self) -> None:
        raise UpstreamProtocolError(
            f"the upstream sent a line longer than {self._max_line} bytes "
            "(the cap on one line of its stream)"
        )


class SSEEvent:
    """One server-sent event: its type (``"message"`` unless named), data, and the ``id`` it
    carried, if any."""

    __slots__ = ("data", "event", "id")

    def __init__(self, event: str, data: str, id: str | None = None) -> None:
        self.event = event
        self.data = data
        self.id = id

    def __repr__(self) -> str:
        return f"SSEEvent(event={self.event!r}, data={self.data!r}, id={self.id!r})"


class SSEParser:
    """Turns SSE lines into events, per the WHATWG rules: ``data:`` lines accumulate, a blank
    line dispatches, ``:`` starts a comment (keep-alives), unknown fields are ignored."""

    def __init__(self) -> None:
        self._event = ""
        self._id: str | None = None
        self._data: list[str] = []

    def feed_line(self, line: bytes) -> SSEEvent | None:
        """One line (without its ending); returns the event a blank line completes."""
        if not line:
            if not self._data:
                self._event = ""
                self._id = None
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event = ""
            self._id = None
            self._data = []
            return event
        if line.startswith(b":"):
            return None
        text = line.decode("utf-8", errors="replace")
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def close(self) -> SSEEvent | None:
        """The stream ended: an event still being accumulated, if any (servers that omit the
        final blank line)."""
        return self.feed_line(b"")


_SURROGATE = re.compile("[\ud800-\udfff]")


def mend_surrogates(text: str) -> str:
    """``text`` with its UTF-16 surrogate pairs joined into the characters they stand for and
    any lone surrogate replaced by U+FFFD, so that it can be encoded as UTF-8."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class SurrogateJoiner:
    """Mends text that arrives in pieces cut inside a UTF-16 surrogate pair.

    JSON can escape a character outside the Basic Multilingual Plane (an emoji) as two
    surrogates, and an upstream that splits its text between them sends ``"\\ud83d"`` in
    one chunk and ``"\\ude00"`` in the next. Each piece alone decodes to a lone surrogate,
    which no UTF-8 writer accepts. A high surrogate at the end of a piece is held back and
    put in front of the next one; anything still lone becomes U+FFFD.
    """

    __slots__ = ("_high",)

    def __init__(self) -> None:
        self._high = ""

    def feed(self, text: str) -> str:
        """The next piece; returns what can be written now."""
        if self._high:
            text = self._high + text
            self._high = ""
        elif text.isascii():
            return text
        if text and "\ud800" <= text[-1] <= "\udbff":
            self._high = text[-1]
            text = text[:-1]
        return mend_surrogates(text)

    def flush(self) -> str:
        """The end of the text: a high surrogate still held back, as U+FFFD."""
        held = self._high
        self._high = ""
        return "\ufffd" if held else ""
