"""A two-turn agent loop against `adaspec serve` through the official openai client (the by-hand check of issue 19).

    adaspec serve --port 8719 &      # the real default model
    python scripts/agent_loop.py http://127.0.0.1:8719/v1

For tool_choice auto and required, streaming and not: the first turn (a call,
or a direct answer), the tool result sent back, the final answer.
"""
import json, sys
import openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="x", max_retries=0, timeout=600)
model = c.models.list().data[0].id
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                         "required": ["city", "unit"]}}}]
def collect(stream, **kw):
    if not stream:
        r = c.chat.completions.create(**kw); m = r.choices[0].message
        return m.content, [(t.id, t.function.name, t.function.arguments) for t in m.tool_calls or []], r.choices[0].finish_reason
    content, calls, fin = "", {}, None
    for ch in c.chat.completions.create(stream=True, **kw):
        if not ch.choices: continue
        d = ch.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            s = calls.setdefault(t.index, ["", "", ""])
            s[0] = t.id or s[0]; s[1] += (t.function.name or "") if t.function else ""; s[2] += (t.function.arguments or "") if t.function else ""
        fin = ch.choices[0].finish_reason or fin
    return content, [tuple(v) for _, v in sorted(calls.items())], fin
for stream in (False, True):
    for choice in ("auto", "required"):
        msgs = [{"role": "user", "content": "What's the weather like in Paris today? Use celsius."}]
        content, calls, fin = collect(stream, model=model, messages=msgs, tools=tools, tool_choice=choice, temperature=0, max_tokens=120)
        print(f"--- stream={stream} tool_choice={choice}: finish={fin} calls={calls} content={content!r}")
        if not calls: continue
        msgs.append({"role": "assistant", "content": content, "tool_calls": [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]})
        for i, n, a in calls:
            msgs.append({"role": "tool", "tool_call_id": i, "content": json.dumps({"temperature": 18, "unit": "celsius", "sky": "sunny"})})
        content, calls2, fin = collect(stream, model=model, messages=msgs, tools=tools, temperature=0, max_tokens=80)
        print(f"    final: finish={fin} calls={calls2} content={content!r}")
