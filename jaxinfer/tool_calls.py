"""Tool calling for /v1/chat/completions: tools into the prompt, the output constrained or parsed back
into OpenAI `tool_calls`.

    request tools + tool_choice
      -> render_messages: the model's template gets `tools` when it has a tools section; otherwise
         DEFAULT FORMAT: the tools and how to call them in a system message, earlier assistant calls
         as <tool_call>{"name": ..., "arguments": {...}}</tool_call> lines, tool results as user
         turns wrapped in <tool_response> ... </tool_response> (any template renders those)
      -> constraint: tool_choice "required" / a named function: the output is JSON, constrained by
         the functions' argument schemas (`call_schema`): {"name": ..., "arguments": {...}}, or a
         list of those with parallel_tool_calls; "auto": unconstrained, <tool_call> blocks parsed
         out of the text (`parse_auto`, streamed through `AutoStream`); "none": plain text
      -> ToolCall(id="call_...", function=(name, arguments as JSON text)), finish_reason "tool_calls"
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _function(tool) -> dict:
    f = tool["function"]
    return {"name": f["name"], "description": f.get("description") or "",
            "parameters": f.get("parameters") or {"type": "object", "properties": {}}}


def call_schema(tools: list[dict], name: str | None = None, parallel: bool = True) -> dict:
    """The JSON schema of the output when a call is required: one call of `name` (a named
    tool_choice), or of any tool; with `parallel`, a non-empty list of calls."""
    functions = [_function(t) for t in tools if name is None or t["function"]["name"] == name]
    one = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    if name is not None or not parallel:
        return call
    return {"type": "array", "items": call, "minItems": 1}


def system_prompt(tools: list[dict], mode: str, name: str | None = None, parallel: bool = True) -> str:
    """The default format's instructions (models whose template has no tools section)."""
    lines = ["You can call these functions (each with a JSON schema of its arguments):"]
    lines += [json.dumps({"type": "function", "function": _function(t)}) for t in tools]
    if mode == "auto":
        lines.append(f'To call a function, reply with {OPEN}{{"name": <function name>, "arguments": <arguments '
                     f'object>}}{CLOSE}, one block per call; otherwise answer normally.')
    elif name is not None:
        lines.append(f'Call the function {name}: reply with {{"name": "{name}", "arguments": <arguments object>}}.')
    elif parallel:
        lines.append('Call one or more of the functions: reply with a JSON list of calls, '
                     '[{"name": <function name>, "arguments": <arguments object>}, ...].')
    else:
        lines.append('Call one of the functions: reply with {"name": <function name>, "arguments": <arguments '
                     'object>}.')
    return "\n".join(lines)


def render_messages(messages: list[dict], tools: list[dict] | None, mode: str, template_has_tools: bool,
                    name: str | None = None, parallel: bool = True) -> tuple[list[dict], dict]:
    """OpenAI messages -> (messages for the chat template, extra template variables).

    messages: {"role", "content" (text), optional "tool_calls" [{"id", "function": {"name",
    "arguments" (JSON text)}}], optional "tool_call_id"}.
    """
    if template_has_tools:  # HF's convention: `tools` to the template, arguments as objects
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]
            out.append(m)
        extra = {"tools": [{"type": "function", "function": _function(t)} for t in tools]} if tools and mode != "none" \
            else {}
        return out, extra
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(OPEN + json.dumps({"name": c["function"]["name"],
                                                 "arguments": _loads(c["function"]["arguments"])}) + CLOSE
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(x for x in (m.get("content") or "", calls) if x)})
        elif m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):  # consecutive results: one turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    out = [{k: v for k, v in m.items() if k != "_tool"} for m in out]
    if tools and mode != "none":
        prompt = system_prompt(tools, mode, name, parallel)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _calls(value) -> list[dict] | None:
    """A parsed {"name", "arguments"} object or list of them -> [{"id", "type", "function"}], or None."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        calls.append({"id": call_id(), "type": "function",
                      "function": {"name": item["name"], "arguments": json.dumps(args)}})
    return calls or None


def parse_constrained(text: str) -> list[dict] | None:
    """The tool calls of a required / named call's output (JSON), or None if it did not complete."""
    try:
        return _calls(json.loads(text))
    except ValueError:
        return None


def parse_auto(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool calls) of a free output: its <tool_call> blocks are calls when they hold a
    call's JSON; the text around them is the content (None when only calls)."""
    calls = []
    for block in _BLOCK.findall(text):
        parsed = parse_constrained(block)
        if parsed is None:  # not a call after all: it stays text
            return text, None
        calls += parsed
    if not calls:
        return text, None
    content = _BLOCK.sub("", text).strip()
    return content or None, calls


class AutoStream:
    """Streams an "auto" output's text while holding back anything from <tool_call> on (and a tail
    that may be its start): `feed(delta) -> text to send now`; the held text is parsed at the end."""

    def __init__(self):
        self.text = ""  # everything so far
        self.sent = 0  # characters sent as content

    def feed(self, delta: str) -> str:
        self.text += delta
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            end = start
        else:
            end = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(OPEN[:k]):
                    end -= k
                    break
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent += len(out)
        return out

    def feed_held(self, delta: str) -> str:
        """Keeps `delta` without sending any of it (a required call's JSON)."""
        self.text += delta
        return ""

    def finish(self) -> tuple[str, list[dict] | None]:
        """(content not sent yet, tool calls) once the output ended."""
        _, calls = parse_auto(self.text)
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if calls is None:
            return rest, None
        return _BLOCK.sub("", rest).rstrip(), calls
