"""Tool calling on chat completions: the prompt convention, the output parser, the grammar choice.

Convention (Hermes / Qwen2.5 style, for chat templates without tool support,
such as SmolLM2's):

- the tools are listed in the system message as JSON function signatures
  inside ``<tools></tools>``, with the instruction to answer a call as
  ``<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>``
  (one block per call); an existing system message comes first;
- an assistant message's ``tool_calls`` are rendered in that same form after
  its content;
- consecutive ``tool`` messages become one ``user`` message of
  ``<tool_response>\\n{content}\\n</tool_response>`` blocks (as Qwen2.5's
  template renders them) followed by the line ``Answer with these results.``;
- with ``tool_choice`` ``auto``, the tools are listed only while no tool
  result follows the last user message (:func:`tools_listed`): SmolLM2-135M,
  shown the tool list again after a result, repeats the call instead of
  answering (tried by hand: README, "Tool calls"). ``required`` or a named
  function always lists them;
- untagged output that is nothing but call objects (Qwen2.5-Coder writes
  ``{"name": ..., "arguments": ...}`` lines under ``auto``) is parsed as calls
  too; when streaming, output that starts with ``{`` is held until the end
  to tell (:func:`parse_bare_calls`).

The model's output is parsed back: every complete ``<tool_call>`` block whose
JSON names a listed function becomes an OpenAI ``tool_calls`` entry (arguments
as a JSON string) and ``finish_reason`` is ``"tool_calls"``; the text outside
the blocks is the message content (``None`` when empty). With ``tool_choice``
``required`` or a named function the output is forced by a grammar
(:func:`adaspec.constraints.tool_calls_grammar`) so that the arguments follow
the function's ``parameters`` schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from adaspec.constraints import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

TOOLS_SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


TOOL_RESULTS_INSTRUCTION = "Answer with these results."


def tools_listed(messages: list[dict[str, Any]], forced: bool) -> bool:
    """Whether the prompt lists the tools: always when a call is forced, else until a tool result answers."""
    if forced:
        return True
    for m in reversed(messages):
        if m["role"] == "tool":
            return False
        if m["role"] == "user":
            return True
    return True


def render_messages(messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]]) -> list[dict[str, str]]:
    """Messages with tools, tool calls and tool results as plain ``{"role", "content"}`` messages.

    Args:
        messages: ``{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}``
            with roles system, user, assistant, tool (developer already mapped to system).
        tools: OpenAI tool definitions to list in the system message, or None.
    """
    out: list[dict[str, str]] = []
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = TOOLS_SYSTEM_PROMPT.format(tools=listed)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    results: list[str] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            results.append(f"<tool_response>\n{content}\n</tool_response>")
            if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                out.append({"role": "user", "content": "\n".join(results) + f"\n{TOOL_RESULTS_INSTRUCTION}"})
                results = []
            continue
        if role == "assistant" and m.get("tool_calls"):
            parts = [content] if content else []
            for call in m["tool_calls"]:
                fn = call["function"]
                try:
                    args = json.loads(fn["arguments"]) if fn.get("arguments") else {}
                except json.JSONDecodeError:
                    args = fn["arguments"]
                parts.append(f"{TOOL_CALL_OPEN}\n" + json.dumps({"name": fn["name"], "arguments": args},
                                                                ensure_ascii=False) + f"\n{TOOL_CALL_CLOSE}")
            content = "\n".join(parts)
        msg = {"role": role, "content": content}
        if m.get("name") is not None:
            msg["name"] = m["name"]
        out.append(msg)
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(body: str, names: set[str]) -> Optional[dict[str, Any]]:
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_bare_calls(text: str, names: Sequence[str]) -> Optional[list[dict[str, Any]]]:
    """Untagged calls: ``text`` is only JSON objects ``{"name": <listed>, "arguments": {...}}`` (one
    after another, whitespace between), as Qwen2.5 writes them under ``auto``; else None."""
    dec, pos, calls, text = json.JSONDecoder(), 0, [], text.strip()
    if not text.startswith("{"):
        return None
    while pos < len(text):
        try:
            _, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _parse_call(text[pos:end], set(names))
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return calls or None


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[Optional[str], list[dict[str, Any]]]:
    """Split model output into content and OpenAI ``tool_calls``.

    Returns:
        ``(content or None, tool_calls)``; a block that is not valid JSON or
        names an unknown function stays in the content. Output that is nothing
        but untagged calls (:func:`parse_bare_calls`) is calls too.
    """
    if TOOL_CALL_OPEN not in text:
        bare = parse_bare_calls(text, names)
        if bare:
            return None, bare
    allowed = set(names)
    content, calls, pos = [], [], 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        end = text.find(TOOL_CALL_CLOSE, start)
        if end < 0:
            content.append(text[pos:])
            break
        call = _parse_call(text[start + len(TOOL_CALL_OPEN): end], allowed)
        if call is None:
            content.append(text[pos: end + len(TOOL_CALL_CLOSE)])
        else:
            content.append(text[pos:start])
            calls.append(call)
        pos = end + len(TOOL_CALL_CLOSE)
    joined = "".join(content).strip()
    return (joined or None), calls


@dataclass
class ToolStreamParser:
    """Incremental :func:`parse_tool_calls` for streaming: content deltas and complete tool calls.

    Text that may be the start of a ``<tool_call>`` block is held back until
    the block closes (it becomes a tool call) or turns out to be text.
    """

    names: Sequence[str]
    buffer: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    sent_content: bool = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """New text in; ``(content to send now, tool calls completed now)`` out."""
        self.buffer += text
        if not self.sent_content and not self.calls and self.buffer.lstrip().startswith("{"):
            # maybe untagged calls (parse_bare_calls): held to the end, then calls or content
            if not final:
                return "", []
            bare = parse_bare_calls(self.buffer, self.names)
            if bare:
                self.buffer = ""
                self.calls.extend(bare)
                return "", bare
        content, calls = [], []
        while self.buffer:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, TOOL_CALL_OPEN)
                content.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            content.append(self.buffer[:start])
            self.buffer = self.buffer[start:]
            end = self.buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                if final:
                    content.append(self.buffer)
                    self.buffer = ""
                break
            block = self.buffer[: end + len(TOOL_CALL_CLOSE)]
            call = _parse_call(block[len(TOOL_CALL_OPEN): -len(TOOL_CALL_CLOSE)], set(self.names))
            if call is None:
                content.append(block)
            else:
                calls.append(call)
            self.buffer = self.buffer[end + len(TOOL_CALL_CLOSE):]
        text_out = "".join(content)
        if self.calls or calls:  # whitespace between calls is layout, not content
            text_out = text_out if text_out.strip() else ""
        elif not self.sent_content:
            text_out = text_out.lstrip()
        if text_out:
            self.sent_content = True
        self.calls.extend(calls)
        return text_out, calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for j in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:j]):
            return j
    return 0
