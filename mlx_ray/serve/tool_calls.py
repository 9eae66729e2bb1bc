"""Tool calls in OpenAI's shape: mlx-lm's parsers for the model's output, a grammar to force them.

Parsing reuses ``mlx_lm.tool_parsers`` (the module the chat template selects,
``engine/chat_format.py``): each completed tool-call section of the output goes
through its ``parse_tool_call(text, tools)``, and each call becomes an OpenAI
``tool_calls`` entry with a fresh id, as mlx_lm.server's ``ToolCallFormatter``
does.

``tool_choice: "required"`` or a named function are enforced by constrained
decoding: :func:`forced_grammar` writes a Lark grammar of the template's own
call syntax whose JSON body must match one of the tools (name and arguments
schema, strict as vLLM's: no property beyond those declared), so even a small
model emits a valid call. That syntax is known for
hermes-style templates (``<tool_call>{json}</tool_call>``, mlx-lm's
``json_tools``: Qwen2.5, Qwen3, Hermes and their kin); for other templates a
forced ``tool_choice`` is refused with a 400.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Optional, Union

from ..engine.chat_format import tool_parser_module
from ..engine.protocol import Grammar
from ..errors import BadRequest

log = logging.getLogger("mlx_ray.serve")

FORCEABLE = {"json_tools"}  # parsers whose call syntax forced_grammar writes


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_section(parser: str, text: str, tools: Optional[list]) -> Optional[list[dict]]:
    """OpenAI tool calls of one tool-call section, or None when it does not parse."""
    try:
        parsed = tool_parser_module(parser).parse_tool_call(text, tools)
    except Exception as e:  # noqa: BLE001 - any parser failure: the text stays content
        log.info("tool call did not parse (%s: %s); returned as content", type(e).__name__, e)
        return None
    calls = []
    for tc in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(tc, dict) or not isinstance(tc.get("name"), str):
            return None
        args = tc.get("arguments", {})
        calls.append({"id": tc.get("id") or new_call_id(), "type": "function",
                      "function": {"name": tc["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return calls


def forced_name(tool_choice: Union[str, dict, None]) -> Optional[str]:
    """The function a named ``tool_choice`` forces (None for the string forms)."""
    if isinstance(tool_choice, dict):
        return tool_choice["function"]["name"]
    return None


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def strict_schema(schema):
    """``schema`` with ``additionalProperties: false`` on every object that does not say otherwise.

    vLLM's default for forced tool calls (xgrammar's strict mode): the arguments hold the declared
    properties and nothing else, so a small model cannot wander off into an undeclared
    ``"description"`` until ``max_tokens`` cuts the call. An explicit ``additionalProperties`` wins.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: strict_schema(v) for k, v in out[key].items()}
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) \
        or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def forced_grammar(parser: Optional[str], tools: list[dict], tool_choice: Union[str, dict],
                   parallel: bool) -> Grammar:
    """A grammar that makes the model write one (or, when ``parallel``, several) valid calls, then stop."""
    if parser not in FORCEABLE:
        raise BadRequest(f"tool_choice {json.dumps(tool_choice)} is enforced for templates that write "
                         f"<tool_call>{{json}}</tool_call> (mlx-lm's json_tools parser); this model's template "
                         f"uses {parser or 'no tool-call syntax'}; use tool_choice \"auto\"", param="tool_choice")
    name = forced_name(tool_choice)
    funcs = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    bodies = [{"type": "object",
               "properties": {"name": {"const": f["name"]},
                              "arguments": strict_schema(f.get("parameters") or {"type": "object"})},
               "required": ["name", "arguments"], "additionalProperties": False} for f in funcs]
    from ..engine.constrain import JSON_OPTIONS, schema_text  # imports MLX: only where a replica builds a grammar

    body = dict(bodies[0] if len(bodies) == 1 else {"anyOf": bodies}, **{"x-guidance": JSON_OPTIONS})
    more = ' ("\\n" call)*' if parallel and name is None else ""
    start, end = tool_parser_module(parser).tool_call_start, tool_parser_module(parser).tool_call_end
    lark = (f"start: call{more}\n"
            f"call: {json.dumps(start + chr(10))} body {json.dumps(chr(10) + end)}\n"
            f"body: %json {schema_text(body)}\n")
    return Grammar("lark", lark, param="tools")
