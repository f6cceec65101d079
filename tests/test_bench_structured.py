"""The structured (agent traffic) benchmark: BFCL functions become valid tools; forced calls equal under speculation."""

import json

from adaspec.bench.structured import _parses, _run_one, bfcl_parameters_schema, bfcl_tools, build_requests
from adaspec.constraints import check_grammar, json_schema_grammar
from adaspec.engine import Engine
from adaspec.prompts import prompts_root, read_jsonl
from adaspec.speculators.suffix import SuffixSpeculator


def test_bfcl_types_become_json_schema():
    s = bfcl_parameters_schema({"type": "dict", "properties": {
        "a": {"type": "float", "default": 1.0}, "b": {"type": "tuple", "items": {"type": "integer"}},
        "c": {"type": "any"}, "d": {"type": "boolean", "optional": True}}, "required": ["a"]})
    assert s == {"type": "object", "properties": {"a": {"type": "number"},
                                                  "b": {"type": "array", "items": {"type": "integer"}},
                                                  "c": {}, "d": {"type": "boolean"}},
                 "required": ["a"], "additionalProperties": False}


def test_every_shipped_bfcl_function_compiles(tiny_target):
    n = 0
    for path in sorted((prompts_root() / "bfcl").glob("BFCL_v4_*.json")):
        for r in read_jsonl(path):
            for t in bfcl_tools(r["function"]):
                assert all(c.isalnum() or c in "_-" for c in t["function"]["name"])
                check_grammar(json_schema_grammar(t["function"]["parameters"]), tiny_target.tokenizer,
                              tiny_target.vocab_size)
                n += 1
    assert n > 0


def test_forced_calls_equal_under_speculation_and_parse(tiny_target):
    plain = Engine(tiny_target)
    spec = Engine(tiny_target, [SuffixSpeculator()], lookahead=6)
    reqs = build_requests(plain, 3, seed=0, form="tools", max_tokens=96)
    assert len(reqs) == 3
    for req in reqs:
        a, b = _run_one(plain, req, 96), _run_one(spec, req, 96)
        assert a["tokens"] == b["tokens"]
        assert a["masks"] == len(a["tokens"]) or a["finish"] == "stop"
        if a["finish"] == "stop":
            assert _parses(a["text"], "tools", req.names)
    for req in build_requests(plain, 2, seed=1, form="json_schema", max_tokens=96):
        r = _run_one(spec, req, 96)
        if r["finish"] == "stop":
            assert json.loads(r["text"])["name"] in req.names
