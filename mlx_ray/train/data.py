"""Training data: a JSONL file in one of the formats mlx-lm's tuner accepts, checked before any training starts.

Formats (mlx-lm's ``tuner/datasets.py``, which picks one from the first line for the whole file):

- chat: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
  (optionally ``"tools"``);
- completions: ``{"prompt": "...", "completion": "..."}``;
- text: ``{"text": "..."}``.

A bad line is refused in one line naming the file, the line number and what is wrong, so a typo on line
40,000 costs a second, not a loaded model and an hour of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_ray.conversion.source import sha256_file
from mlx_ray.errors import BadRequest, NotFound

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("chat", "completions", "text")


@dataclass
class DataFile:
    path: str
    format: str  # chat | completions | text
    rows: int
    sha256: str


def _format_of(row: dict) -> str | None:
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


def _problem(row, fmt: str | None, mask_prompt: bool) -> str | None:
    """What is wrong with one parsed line (given the file's format), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    have = _format_of(row)
    if have is None:
        return (f"no 'messages', 'prompt'+'completion' or 'text' field (has: {', '.join(sorted(row)) or 'nothing'})")
    if fmt is not None and have != fmt:
        return f"a {have} line in a {fmt} file (mlx-lm takes the format of the first line for every line)"
    if have == "completions":
        for k in ("prompt", "completion"):
            if not isinstance(row[k], str):
                return f"'{k}' must be a string, got {type(row[k]).__name__}"
        if not row["completion"]:
            return "'completion' is empty"
    elif have == "text":
        if not isinstance(row["text"], str) or not row["text"]:
            return "'text' must be a non-empty string"
        if mask_prompt:
            return "--mask-prompt needs chat or completions data; text lines have no prompt to mask"
    else:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return f"messages[{i}] must be an object with 'role' and 'content'"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}"
            content = m.get("content")
            if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
                return f"messages[{i}].content must be a string"
        if msgs[-1].get("role") != "assistant":
            return "the last message must be the assistant's (the answer to learn)"
        if "tools" in row and not isinstance(row["tools"], list):
            return "'tools' must be a list"
    return None


def validate(path: str | Path, *, min_rows: int = 1, mask_prompt: bool = False, param: str = "data") -> DataFile:
    """Check every line of a JSONL file; BadRequest (one line: file, line number, what) on the first bad one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NotFound(f"data file {p} not found", param=param)
    fmt: str | None = None
    rows = 0
    try:
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # mlx-lm's json.loads would fail on it; we skip it when loading too
                try:
                    row = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise BadRequest(f"{p}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})", param=param) from e
                except ValueError as e:
                    raise BadRequest(f"{p}:{lineno}: not valid JSON ({e})", param=param) from e
                why = _problem(row, fmt, mask_prompt)
                if why:
                    raise BadRequest(f"{p}:{lineno}: {why}", param=param)
                fmt = fmt or _format_of(row)
                rows += 1
    except OSError as e:
        raise BadRequest(f"cannot read data file {p}: {e}", param=param) from e
    if rows < min_rows:
        raise BadRequest(f"{p} has {rows} example(s); at least {min_rows} are needed (one batch)", param=param)
    return DataFile(path=str(p.resolve()), format=fmt or "text", rows=rows, sha256=sha256_file(p))


def load_rows(path: str | Path) -> list[dict]:
    """The examples of a validated file (blank lines skipped)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]
