"""The drift benchmark's tool-call phase as agent traffic: BFCL functions as real tools, output forced by grammar.

Each BFCL prompt (the tools phase of the drift benchmark, ``adaspec.prompts``)
becomes a chat request the way the server renders it: the functions as OpenAI
tool definitions listed in the system message (``adaspec.server.tools``), the
user's question, and ``tool_choice: "required"``, so the output is forced by
:func:`adaspec.constraints.tool_calls_grammar`: every call's arguments follow
the function's ``parameters`` JSON schema (BFCL's types converted to JSON
Schema by :func:`bfcl_parameters_schema`). With ``--form json_schema`` the
output is instead one JSON object ``{"name", "arguments"}`` through
``response_format: json_schema`` (an ``anyOf`` over the functions).

Systems, interleaved request by request in one process (who runs first
rotates): ``plain`` (constrained plain decoding: one token per forward, the
grammar mask at each), ``atlas`` (the confidence-aware controller,
grammar-forced tokens as free drafts, drafts cut at their first illegal
token) and, with ``--ablation``, ``atlas-no-forced`` (the same without the
forced drafts). Greedy outputs must be identical;
the run reports any mismatch. Reported: output tok/s of each system
(total output tokens / total generation seconds), the speed-up, and the
grammar engine's cost per output token and per mask.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaspec import config
from adaspec.constraints import check_grammar, json_schema_grammar, tool_call_schema, tool_calls_grammar
from adaspec.engine import Engine
from adaspec.prompts import prompts_root, read_jsonl
from adaspec.server.tools import render_messages
from adaspec.types import SamplingParams

_BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "int": "integer",
               "bool": "boolean", "str": "string", "String": "string", "Boolean": "boolean", "long": "integer",
               "double": "number", "char": "string", "byte": "integer", "short": "integer"}
_DROP_KEYS = {"optional", "default", "format"}


def bfcl_parameters_schema(node: Any) -> Any:
    """BFCL's parameter schema -> JSON Schema (``dict`` -> object, ``float`` -> number, ``any`` -> any, ...).

    ``optional`` and ``default`` are dropped (they do not constrain a value);
    unknown type names become unconstrained; an ``enum`` on an array moves to
    its items (BFCL's meaning).
    """
    if isinstance(node, list):
        return [bfcl_parameters_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in _DROP_KEYS:
            continue
        if k == "type":
            t = _BFCL_TYPES.get(v, v) if isinstance(v, str) else v
            if t in ("any", "ANY") or (isinstance(t, str) and t not in
                                       ("object", "number", "array", "integer", "boolean", "string", "null")):
                continue
            out[k] = t
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: bfcl_parameters_schema(s) for name, s in v.items()}
        else:
            out[k] = bfcl_parameters_schema(v)
    if out.get("type") == "array" and isinstance(out.get("items"), dict) and not out["items"]:
        out.pop("items")
    if out.get("type") == "array" and "enum" in out:  # BFCL's enum on an array lists the items' values
        out["items"] = {**(out.get("items") or {}), "enum": out.pop("enum")}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def bfcl_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL functions as OpenAI tool definitions (names with '.' become '_': OpenAI's name pattern)."""
    return [{"type": "function", "function": {
        "name": f["name"].replace(".", "_"), "description": f.get("description", ""),
        "parameters": bfcl_parameters_schema(f.get("parameters") or {"type": "dict", "properties": {}})}}
        for f in functions]


@dataclass
class StructuredRequest:
    prompt_id: str
    prompt_ids: list[int]
    grammar: str
    names: list[str]


def build_requests(engine: Engine, count: int, seed: int, form: str, max_tokens: int) -> list[StructuredRequest]:
    """``count`` BFCL prompts (seeded sample of every BFCL file) that fit the window with ``max_tokens``."""
    rows = []
    for path in sorted((prompts_root() / "bfcl").glob("BFCL_v4_*.json")):
        rows.extend(read_jsonl(path))
    random.Random(f"structured:{seed}").shuffle(rows)
    out = []
    for r in rows:
        turns = r["question"][0] if r["question"] and isinstance(r["question"][0], list) else r["question"]
        tools = bfcl_tools(r["function"])
        funcs = [(t["function"]["name"], t["function"]["parameters"]) for t in tools]
        if form == "tools":
            # BFCL's parallel categories expect several calls; the others one.
            grammar = tool_calls_grammar(funcs, parallel="parallel" in r["id"])
            messages = render_messages([{"role": m["role"], "content": m["content"]} for m in turns], tools)
        else:
            grammar = json_schema_grammar({"anyOf": [tool_call_schema(n, p) for n, p in funcs]})
            listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
            messages = [{"role": "system", "content": "Answer with one JSON object {\"name\": <function-name>, "
                         f"\"arguments\": <args-json-object>}} calling one of these functions:\n{listed}"},
                        *[{"role": m["role"], "content": m["content"]} for m in turns]]
        try:
            ids = engine.apply_chat_template(messages)
            check_grammar(grammar, engine.tokenizer, engine.target.vocab_size)
        except ValueError as e:
            print(f"skipping {r['id']}: {e}"[:200])
            continue
        if len(ids) + max_tokens >= engine.target.max_model_len:
            continue
        out.append(StructuredRequest(r["id"], ids, grammar, [n for n, _ in funcs]))
        if len(out) == count:
            break
    return out


def _run_one(engine: Engine, req: StructuredRequest, max_tokens: int) -> dict[str, Any]:
    state = engine.start(req.prompt_ids, SamplingParams(max_tokens=max_tokens, grammar=req.grammar))
    c = state.constraint
    t0 = time.perf_counter()
    while not state.finished:
        engine.step(state)
    elapsed = time.perf_counter() - t0
    res = engine.result(state)
    return {"tokens": list(res.token_ids), "text": res.text, "elapsed_s": elapsed, "finish": res.finish_reason,
            "grammar_s": c.mask_s, "masks": c.masks, "steps": res.speculation.target_forwards,
            "steps_by_speculator": dict(res.speculation.steps_by_speculator),
            "accepted": res.speculation.accepted, "proposed": res.speculation.proposed}


def run_structured(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; writes ``records.jsonl`` and ``summary.json`` under ``args.out``."""
    target = config.load_config_target(config.config_from_args(args), log=print)
    engines = {"plain": Engine(target)}

    def atlas() -> Engine:
        return Engine(target, controller=config.build_controller(
            config.EngineConfig(model=target.name, speculator="atlas", lookahead=args.lookahead), target))

    engines["atlas"] = atlas()
    if args.ablation:  # the same controller, without the grammar's forced drafts
        engines["atlas-no-forced"] = atlas()
        engines["atlas-no-forced"].grammar_drafts = False
    plain = engines["plain"]
    reqs = build_requests(plain, args.requests, args.seed, args.form, args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for e in engines.values():  # warm-up (kernels, grammar tokenizer)
        _run_one(e, reqs[0], 8)
    names = list(engines)
    totals = {s: {"tokens": 0, "seconds": 0.0, "grammar_s": 0.0, "masks": 0} for s in names}
    mismatches, valid = [], 0
    with (out / "records.jsonl").open("w") as f:
        for i, req in enumerate(reqs):
            rec: dict[str, Any] = {"prompt_id": req.prompt_id, "prompt_tokens": len(req.prompt_ids)}
            order = names[i % len(names):] + names[: i % len(names)]  # rotate who runs first
            for name in order:
                r = _run_one(engines[name], req, args.max_tokens)
                rec[name] = r
                t = totals[name]
                t["tokens"] += len(r["tokens"])
                t["seconds"] += r["elapsed_s"]
                t["grammar_s"] += r["grammar_s"]
                t["masks"] += r["masks"]
            if any(rec[n]["tokens"] != rec["plain"]["tokens"] for n in names):
                mismatches.append(req.prompt_id)
            valid += _parses(rec["plain"]["text"], args.form, req.names)
            f.write(json.dumps({**rec, **{n: {k: v for k, v in rec[n].items() if k != "tokens"} for n in names}})
                    + "\n")
            print(f"[{i + 1}/{len(reqs)}] {req.prompt_id}: " + " ".join(
                f"{n} {len(rec[n]['tokens']) / rec[n]['elapsed_s']:.1f}" for n in names) + " tok/s", flush=True)
    summary = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "requests": len(reqs),
               "mismatches": mismatches, "outputs_parsed": valid}
    for name, t in totals.items():
        summary[name] = {**t, "tok_per_s": t["tokens"] / t["seconds"],
                         "grammar_us_per_token": 1e6 * t["grammar_s"] / max(1, t["tokens"]),
                         "grammar_us_per_mask": 1e6 * t["grammar_s"] / max(1, t["masks"]),
                         "grammar_share": t["grammar_s"] / t["seconds"]}
    summary["speedup"] = summary["atlas"]["tok_per_s"] / summary["plain"]["tok_per_s"]
    if args.ablation:
        summary["speedup_no_forced"] = summary["atlas-no-forced"]["tok_per_s"] / summary["plain"]["tok_per_s"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _parses(text: str, form: str, names: list[str]) -> bool:
    """Whether the output is a complete call (or calls) of the request's functions."""
    from adaspec.server.tools import parse_tool_calls

    if form == "json_schema":
        try:
            return json.loads(text).get("name") in names
        except (json.JSONDecodeError, AttributeError):
            return False
    content, calls = parse_tool_calls(text, names)
    return bool(calls) and content is None


def add_structured_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``adaspec bench structured``."""
    config.add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=40, help="BFCL prompts (default: %(default)s)")
    parser.add_argument("--form", choices=("tools", "json_schema"), default="tools",
                        help="tools: tool_choice required (a grammar per function's parameters); json_schema: "
                             "response_format json_schema over the functions (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default: %(default)s)")
    parser.add_argument("--lookahead", type=int, default=config.ATLAS_LOOKAHEAD,
                        help="atlas's largest lookahead (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling seed (default: %(default)s)")
    parser.add_argument("--ablation", action="store_true",
                        help="also run atlas without the grammar's forced drafts (atlas-no-forced)")
    parser.add_argument("--out", default="bench_out/structured", help="output folder (default: %(default)s)")


def structured_from_args(args: argparse.Namespace) -> int:
    s = run_structured(args)
    print(json.dumps({k: v for k, v in s.items() if k != "args"}, indent=2))
    return 0
