"""Server-sent events, as far as a proxy needs them: split a byte stream into whole events, and put the
public model name into each event (and into a JSON body) without re-encoding anything else.

Why not an SSE library: the router forwards each event's bytes as they are (tools, logprobs and
``response_format`` output pass through untouched); it only has to know where an event ends, whether it
is a comment (``: keepalive``) or data, and where the ``"model"`` key's value is. Parsing and
re-serializing every chunk's JSON would cost more than the rest of the proxy together.
"""

from __future__ import annotations

import json
import re
from typing import AsyncIterator, Optional

DONE = b"data: [DONE]"


def model_rewriter(upstream_model: str, public_model: str):
    """A function that replaces the ``"model": "<upstream_model>"`` member of JSON text by the public name.

    Only a structural key matches: inside a JSON string every quote is escaped (``\\"model\\"``), so the
    look-behind keeps generated text that merely mentions a model key untouched."""
    value = json.dumps(upstream_model).encode()
    pattern = re.compile(rb'(?<!\\)"model"\s*:\s*' + re.escape(value))
    replacement = b'"model":' + json.dumps(public_model).encode()
    # The two spellings servers write, replaced as plain bytes (an escaped key inside a string reads \"model\":
    # and never matches them); the pattern only for other spacing. Per streamed event, this is the hot path.
    compact, spaced = b'"model":' + value, b'"model": ' + value
    if upstream_model == public_model:
        return lambda data: data

    def rewrite(data: bytes) -> bytes:
        if compact in data:
            return data.replace(compact, replacement)
        if spaced in data:
            return data.replace(spaced, replacement)
        return pattern.sub(lambda _m: replacement, data) if b'"model"' in data else data

    return rewrite


class EventReader:
    """Whole events (``b"data: {...}"``, ``b": keepalive"``, without the blank line that ends them) from an
    async byte iterator, a batch at a time: ``await next()`` returns the events completed by the next
    chunk (possibly none), or None when the stream has ended. A last event without its blank line is
    returned as it is, at the end."""

    def __init__(self, chunks: AsyncIterator[bytes]):
        self._chunks = chunks.__aiter__()
        self._buf = b""
        self.ended = False

    async def next(self) -> Optional[list[bytes]]:
        if self.ended:
            return None
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.ended = True
            rest, self._buf = self._buf.strip(), b""
            return [rest] if rest else None
        buf = self._buf + chunk.replace(b"\r\n", b"\n")
        *events, self._buf = buf.split(b"\n\n")
        return [e for e in events if e.strip()]


def is_data(event: bytes) -> bool:
    return event.startswith(b"data:")


def error_event(body: bytes) -> bytes:
    """An OpenAI error body as the stream's last event, followed by ``[DONE]``."""
    return b"data: " + body + b"\n\n" + DONE + b"\n\n"
