"""Agent traffic through the official openai client: tool calls, tool results, structured output.

The tiny random model exercises the mechanics (a forced call is always
well-formed because the grammar forces it; the server parses it back into
``tool_calls``); the real default model runs the two-turn agent loop with
``tool_choice`` auto and required, streaming and not.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.server.tools import ToolStreamParser, parse_tool_calls, render_messages
from adaspec.speculators import NgramSpeculator
from adaspec.speculators.suffix import SuffixSpeculator

MODEL = "tiny-test"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 30}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["answer", "confidence", "tags"], "additionalProperties": False}


def _serve(target, **kw):
    engine = Engine(target, [NgramSpeculator(), SuffixSpeculator()], lookahead=6)
    return BackgroundServer(create_app(engine, kw.pop("name", MODEL), max_active=4, max_queue=8,
                                       request_timeout_s=300))


@pytest.fixture(scope="module")
def client(tiny_target):
    with _serve(tiny_target) as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _stream(client, **kw) -> tuple[str, list[dict[str, Any]], str]:
    """Content, tool calls (assembled from OpenAI's deltas), finish reason."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        if ch.delta.content:
            content += ch.delta.content
        for tc in ch.delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        if ch.finish_reason:
            finish = ch.finish_reason
    return content, [calls[i] for i in sorted(calls)], finish


def _check_call(name: str, arguments: str, tools) -> dict:
    import jsonschema_rs

    fn = next(t["function"] for t in tools if t["function"]["name"] == name)
    args = json.loads(arguments)
    jsonschema_rs.validate(fn["parameters"], args)
    return args


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_forced_tool_call_round_trip(client, stream):
    tools = [WEATHER, TIME]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, messages=messages, tools=tools, tool_choice="required", temperature=0, max_tokens=80)
    if stream:
        content, calls, finish = _stream(client, **kw)
    else:
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        content, finish = msg.content, r.choices[0].finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
    assert finish == "tool_calls" and calls and not content
    for c in calls:
        assert c["id"].startswith("call_")
        _check_call(c["name"], c["arguments"], tools)
    # Turn 2: the tool's result goes back; the model answers (free text).
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]})
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"temp_c": 18})})
    kw = dict(model=MODEL, messages=messages, tools=tools, tool_choice="none", temperature=0, max_tokens=12)
    if stream:
        content, calls2, finish = _stream(client, **kw)
    else:
        r = client.chat.completions.create(**kw)
        content, calls2, finish = r.choices[0].message.content, r.choices[0].message.tool_calls, \
            r.choices[0].finish_reason
    assert finish in ("stop", "length") and not calls2 and isinstance(content, str)


def test_named_tool_choice_calls_that_function_once(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "time?"}],
                                       tools=[WEATHER, TIME], temperature=0, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_time"
    assert _check_call("get_time", calls[0].function.arguments, [TIME])["tz"] in ("UTC", "CET", "PST")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_always_parses_and_validates(client, temperature):
    import jsonschema_rs

    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Answer {seed}"}],
                                           response_format=fmt, temperature=temperature, seed=seed,
                                           max_tokens=120)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema_rs.validate(SCHEMA, json.loads(r.choices[0].message.content))
    content, _, finish = _stream(client, model=MODEL, messages=[{"role": "user", "content": "x"}],
                                 response_format=fmt, temperature=0, max_tokens=120)
    assert finish == "stop"
    jsonschema_rs.validate(SCHEMA, json.loads(content))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_errors_name_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "launch"}})
    assert e.value.body["param"] == "tool_choice.function.name"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[bad])
    assert e.value.body["param"] == "tools[0].function.parameters"
    for choice in ("required", {"type": "function", "function": {"name": WEATHER["function"]["name"]}}):
        with pytest.raises(openai.BadRequestError) as e:  # a forced call leaves nothing for a format to shape
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                           tool_choice=choice, response_format={"type": "json_object"})
        assert e.value.body["param"] == "response_format" and "tool_choice" in e.value.body["message"]


def test_penalties_and_logit_bias_accepted(client, tiny_target):
    tok = tiny_target.tokenizer.convert_tokens_to_ids("Paris")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=0,
                                       max_tokens=3, presence_penalty=2.0, frequency_penalty=0.0,
                                       logit_bias={str(tok): 100})
    # +100 makes the token the argmax; the presence penalty is only 2, so it repeats
    assert r.choices[0].message.content == "Paris" * 3


# ------------------------------------------------------------------ the convention and the parser
def test_render_and_parse_round_trip():
    msgs = render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"id": "call_1", "type": "function",
                                 "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
                            {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}], [TIME])
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.") and "<tools>" in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>\n"
                                                  "Answer with these results."}
    text = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(text, ["get_time"])
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "CET"}
    assert content.startswith("Sure.") and "nope" in content  # an unknown function stays text
    for cut in range(1, len(text)):  # streaming in any split gives the same calls and content
        p = ToolStreamParser(["get_time"])
        a, ca = p.feed(text[:cut])
        b, cb = p.feed(text[cut:], final=True)
        assert [c["function"]["arguments"] for c in ca + cb] == [calls[0]["function"]["arguments"]]
        assert (a + b).strip() == content


def test_untagged_calls_are_calls_and_other_json_stays_content():
    """Qwen2.5-Coder under tool_choice auto writes bare ``{"name": ..., "arguments": ...}`` lines."""
    bare = '{"name": "get_time", "arguments": {"tz": "UTC"}}\n{"name": "get_time", "arguments": {"tz": "CET"}}'
    content, calls = parse_tool_calls(bare, ["get_time"])
    assert content is None and [json.loads(c["function"]["arguments"])["tz"] for c in calls] == ["UTC", "CET"]
    for text in ('{"name": "other", "arguments": {}}', '{"answer": 42}', '{"name": "get_time", "arguments": {}} and'):
        assert parse_tool_calls(text, ["get_time"]) == (text, [])  # not only calls to listed functions: content
    for text, want in ((bare, 2), ('{"answer": 42}', 0)):
        for cut in range(1, len(text)):
            p = ToolStreamParser(["get_time"])
            a, ca = p.feed(text[:cut])
            b, cb = p.feed(text[cut:], final=True)
            assert a == "" and len(ca + cb) == want  # held to the end, then calls or content
            assert b == ("" if want else text)


# ------------------------------------------------------------------ the real model: a two-turn agent loop
@pytest.mark.real_model
@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_real_model_agent_loop(real_target, stream):
    with _serve(real_target, name="smollm2") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        tools = [WEATHER, TIME]
        for choice in ("auto", "required"):
            messages = [{"role": "system", "content": "You are an assistant that uses tools."},
                        {"role": "user", "content": "What is the weather in Paris, in celsius?"}]
            kw = dict(model="smollm2", messages=messages, tools=tools, tool_choice=choice, temperature=0,
                      max_tokens=100)
            if stream:
                content, calls, finish = _stream(client, **kw)
            else:
                r = client.chat.completions.create(**kw)
                m = r.choices[0].message
                content, finish = m.content, r.choices[0].finish_reason
                calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                         for c in m.tool_calls or []]
            if choice == "required":
                assert finish == "tool_calls" and calls
            if not calls:  # auto: the model may answer directly; then that answer is the final one
                assert finish in ("stop", "length") and content
                continue
            for c in calls:
                _check_call(c["name"], c["arguments"], tools)
            messages.append({"role": "assistant", "content": content, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls]})
            for c in calls:
                messages.append({"role": "tool", "tool_call_id": c["id"],
                                 "content": json.dumps({"city": "Paris", "temperature": 18, "unit": "celsius"})})
            kw = dict(model="smollm2", messages=messages, tools=tools, temperature=0, max_tokens=60)
            if stream:
                content, _, finish = _stream(client, **kw)
            else:
                r = client.chat.completions.create(**kw)
                content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert finish in ("stop", "length", "tool_calls")
            assert content or finish == "tool_calls"
