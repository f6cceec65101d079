"""Per-token mask cost of the grammar engines on this CPU, with the SmolLM2 tokenizer.

Walks each engine through the tokens of real structured outputs (BFCL tool
calls, converted to JSON schema as ``adaspec bench structured`` does, and a
small weather schema) and times the call that computes the next-token mask at
every position (xgrammar ``fill_next_token_bitmask``, llguidance
``fill_next_token_bitmask``, outlines-core ``Guide.get_tokens`` plus turning
its token list into a mask), one thread. Also the one-time costs: tokenizer
preparation and grammar compilation per schema.

Only llguidance is a dependency; to compare the others install them beside it,
e.g. ``pip install --target /tmp/gramtest xgrammar==0.2.9 apache-tvm-ffi outlines-core==0.2.14 --no-deps``
and pass ``--extra-path /tmp/gramtest``.

    python scripts/grammar_engine_cost.py [--extra-path DIR] [--schemas 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra-path", default=None, help="a folder with xgrammar / outlines-core installed")
    ap.add_argument("--schemas", type=int, default=20, help="BFCL functions to walk (default: %(default)s)")
    args = ap.parse_args()
    if args.extra_path:
        sys.path.append(args.extra_path)
    import torch
    from transformers import AutoTokenizer

    from adaspec.bench.structured import bfcl_tools
    from adaspec.models import resolve_model
    from adaspec.prompts import prompts_root, read_jsonl

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct", progress=False))
    V = len(tok)
    docs = []  # (schema, JSON text that validates)
    rows = []
    for path in sorted((prompts_root() / "bfcl").glob("BFCL_v4_*.json")):
        rows.extend(read_jsonl(path))
    for r in rows:
        for t in bfcl_tools(r["function"]):
            params = t["function"]["parameters"]
            doc = _example(params)
            if doc is not None:
                docs.append((params, json.dumps(doc)))
        if len(docs) >= args.schemas:
            break
    engines = {}
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as llt

        def llg_setup():
            return llguidance.hf.from_tokenizer(tok, n_vocab=V)

        def llg_compile(lt, schema):
            g = llguidance.LLMatcher.grammar_from_json_schema(
                {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                          "key_separator": ": "}})
            return llguidance.LLMatcher(lt, g), llt.allocate_token_bitmask(1, V)

        def llg_mask(state):
            llt.fill_next_token_bitmask(state[0], state[1], 0)

        def llg_advance(state, t):
            return state[0].consume_token(t)

        engines[f"llguidance {_version('llguidance')}"] = (
            llg_setup, llg_compile, llg_mask, llg_advance)
    except ImportError as e:
        print(f"llguidance: not installed ({e})")
    try:
        import xgrammar as xgr

        def xgr_setup():
            return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V))

        def xgr_compile(comp, schema):
            cg = comp.compile_json_schema(json.dumps(schema), any_whitespace=False)
            return xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, V)

        def xgr_mask(state):
            state[0].fill_next_token_bitmask(state[1])

        def xgr_advance(state, t):
            return state[0].accept_token(t)

        engines[f"xgrammar {_version('xgrammar')}"] = (xgr_setup, xgr_compile, xgr_mask, xgr_advance)
    except ImportError as e:
        print(f"xgrammar: not installed ({e})")
    try:
        import outlines_core
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        def oc_setup():
            vmap: dict[str, list[int]] = {}
            for s, i in tok.get_vocab().items():
                if i != tok.eos_token_id:
                    vmap.setdefault(tok.convert_tokens_to_string([s]), []).append(i)
            return Vocabulary(tok.eos_token_id, vmap)

        def oc_compile(voc, schema):
            return Guide(Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?"), voc))

        def oc_mask(guide):
            mask = torch.zeros(V, dtype=torch.bool)
            mask[torch.tensor(guide.get_tokens())] = True

        def oc_advance(guide, t):
            guide.advance(t)
            return True

        engines[f"outlines-core {_version('outlines_core')}"] = (
            oc_setup, oc_compile, oc_mask, oc_advance)
    except ImportError as e:
        print(f"outlines-core: not installed ({e})")
    print(f"{len(docs)} schemas (BFCL function parameters), SmolLM2 tokenizer, V = {V}, one thread")
    print("| engine | tokenizer setup (s) | compile per schema, median (ms) | mask per token, median (us) | "
          "mean (us) | p99 (us) | tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, (setup, compile_, mask, advance) in engines.items():
        t0 = time.perf_counter()
        ctx = setup()
        setup_s = time.perf_counter() - t0
        comp, times, failed = [], [], 0
        for schema, text in docs:
            ids = tok.encode(text, add_special_tokens=False)
            try:
                t0 = time.perf_counter()
                state = compile_(ctx, schema)
                comp.append(time.perf_counter() - t0)
                mask(state)  # the first mask after compiling is set-up, not a per-token cost
                advance(state, ids[0])
                for t in ids[1:]:
                    t0 = time.perf_counter()
                    mask(state)
                    times.append(time.perf_counter() - t0)
                    if not advance(state, t):
                        raise ValueError("token rejected")
            except Exception as e:  # noqa: BLE001 - report and go on
                failed += 1
                print(f"  {name}: {type(e).__name__}: {str(e)[:100]}")
        times.sort()
        print(f"| {name} | {setup_s:.2f} | {1e3 * statistics.median(comp):.1f} | {1e6 * statistics.median(times):.0f} | "
              f"{1e6 * statistics.mean(times):.0f} | {1e6 * times[int(0.99 * (len(times) - 1))]:.0f} | "
              f"{len(times)}{f' ({failed} schemas failed)' if failed else ''} |")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _example(schema) -> object:
    """A small value that validates against ``schema`` (None if unsure)."""
    t = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        out = {}
        for k in schema.get("required", list(props)):
            if k not in props:
                return None
            v = _example(props[k])
            if v is None:
                return None
            out[k] = v
        return out
    return {"string": "Paris, France", "integer": 42, "number": 3.5, "boolean": True,
            "array": []}.get(t) if t else None


if __name__ == "__main__":
    sys.exit(main())
