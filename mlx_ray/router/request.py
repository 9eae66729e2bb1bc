"""What routing needs from a request: an estimate of its prompt's tokens and its sticky key.

The router does not tokenize (the arms may not even share a tokenizer), so the prompt's size is
estimated from its text: a quarter token per ASCII character, one per other character (CJK text runs
about a token per character). The estimate feeds only the spill decision's TTFT prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class RouteRequest:
    """``prompt_tokens``: the prompt's estimated tokens; ``sticky_key``: the user an A/B split keeps on one
    arm (None: anonymous); ``request_id``: hashed instead when there is no sticky key, so anonymous
    requests still split by the weights, each on its own."""

    prompt_tokens: int
    sticky_key: Optional[str] = None
    request_id: str = ""

    @property
    def hash_key(self) -> str:
        return self.sticky_key if self.sticky_key else self.request_id


def estimate_tokens(text: str) -> int:
    ascii_chars = sum(1 for c in text if c < "\x80")
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a chat (``messages``) or completions (``prompt``) body; at least 1.
    Tool definitions count too (the arm renders them into the prompt); images are not counted."""
    n = 0
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            n += 4 + estimate_tokens(_text(m.get("content")))  # 4: the chat template's role markers
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        n += estimate_tokens(prompt)
    elif isinstance(prompt, list):
        for p in prompt:
            n += estimate_tokens(p) if isinstance(p, str) else (len(p) if isinstance(p, list) else 1)
    if body.get("tools"):
        n += estimate_tokens(str(body["tools"]))
    return max(1, n)


def sticky_key(body: Mapping[str, Any], headers: Mapping[str, str], sticky_header: Optional[str]) -> Optional[str]:
    """The user an A/B split keeps on one arm: the configured header's value (header names matched
    without case), else the body's ``user`` field; None if neither is there."""
    if sticky_header:
        want = sticky_header.lower()
        for k, v in headers.items():
            if k.lower() == want and v:
                return v
    user = body.get("user")
    return user if isinstance(user, str) and user else None


def route_request(body: Mapping[str, Any], headers: Mapping[str, str], sticky_header: Optional[str],
                  request_id: str) -> RouteRequest:
    """The ``RouteRequest`` for an OpenAI request body and its headers."""
    return RouteRequest(prompt_tokens=estimate_prompt_tokens(body),
                        sticky_key=sticky_key(body, headers, sticky_header), request_id=request_id)
