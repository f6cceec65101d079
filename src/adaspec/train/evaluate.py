"""Measure a draft head inside the engine: acceptance and drafting cost on held-out prompts.

``python -m adaspec.train.evaluate [--checkpoint PATH] [--domains python,rust] [--num-prompts 6]``

For each prompt (chat template, greedy), plain decoding and decoding with the
draft head run back to back, so slow spells of a shared machine hit both:

- the outputs must be identical (greedy exactness);
- **mean acceptance length** = tokens emitted on steps with a draft / steps
  with a draft (the engine's ``SpeculationStats``), pooled over the prompts;
- **acceptance rate** = accepted / proposed draft tokens;
- **drafting cost** = the head's drafting time per draft token divided by one
  plain-decoding target forward (one token fed), both measured in this run.

HumanEval prompts come from tasks 120..163 (never used in training, see
:func:`adaspec.train.data.humaneval_split`); the Rust prompts are HumanEval-X
tasks, a language the head never saw.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional, Sequence

from adaspec.train.data import HUMANEVAL_TRAIN_LIMIT


def heldout_prompts(domain: str, num_prompts: int) -> list:
    """``num_prompts`` prompts of ``domain`` from tasks >= 120, spread evenly (``BenchPrompt`` list)."""
    from adaspec.prompts import load_domain, prompts_root

    rows = load_domain(domain, prompts_root(shipped=False))  # task numbers >= 120 need the full sets
    if domain in ("python", "rust"):
        rows = rows[HUMANEVAL_TRAIN_LIMIT:]
    if num_prompts >= len(rows):
        return rows
    step = len(rows) / num_prompts
    return [rows[int(i * step)] for i in range(num_prompts)]


def measure(target: Any, speculator: Any, prompts: Sequence, max_tokens: int = 96, lookahead: int = 4,
            log: Any = print) -> dict:
    """Plain vs speculative decoding on ``prompts``; see the module docstring for the numbers.

    Returns:
        dict with ``mean_acceptance_length``, ``acceptance_rate``,
        ``draft_ms_per_token``, ``target_forward_ms``, ``draft_cost_ratio``,
        ``exact`` (all outputs identical), ``speedup`` (plain time / head time,
        noisy on a shared machine), and per-prompt rows.
    """
    from adaspec.engine import Engine
    from adaspec.types import SamplingParams

    plain_engine = Engine(target)
    spec_engine = Engine(target, [speculator], lookahead=lookahead)
    params = SamplingParams(max_tokens=max_tokens)
    rows = []
    tot = dict(draft_steps=0, emitted=0, proposed=0, accepted=0, draft_s=0.0, plain_verify_s=0.0, plain_forwards=0,
               plain_s=0.0, spec_s=0.0)
    for p in prompts:
        ids = plain_engine.apply_chat_template(p.messages)
        t0 = time.perf_counter()
        plain = plain_engine.generate(ids, params)
        t1 = time.perf_counter()
        spec = spec_engine.generate(ids, params)
        t2 = time.perf_counter()
        s, ps = spec.speculation, plain.speculation
        tot["draft_steps"] += s.draft_steps
        tot["emitted"] += s.emitted_on_draft_steps
        tot["proposed"] += s.proposed
        tot["accepted"] += s.accepted
        tot["draft_s"] += s.draft_time_s
        tot["plain_verify_s"] += ps.verify_time_s
        tot["plain_forwards"] += ps.target_forwards
        tot["plain_s"] += t1 - t0
        tot["spec_s"] += t2 - t1
        row = {"prompt_id": p.prompt_id, "tokens": len(spec.token_ids), "exact": spec.token_ids == plain.token_ids,
               "mean_acceptance_length": round(s.mean_acceptance_length, 3),
               "acceptance_rate": round(s.acceptance_rate, 3)}
        rows.append(row)
        log(json.dumps(row))
    forward_ms = 1000 * tot["plain_verify_s"] / max(1, tot["plain_forwards"])
    draft_ms = 1000 * tot["draft_s"] / max(1, tot["proposed"])
    return {
        "prompts": len(rows),
        "max_tokens": max_tokens,
        "lookahead": lookahead,
        "exact": all(r["exact"] for r in rows),
        "mean_acceptance_length": round(tot["emitted"] / max(1, tot["draft_steps"]), 3),
        "acceptance_rate": round(tot["accepted"] / max(1, tot["proposed"]), 3),
        "draft_ms_per_token": round(draft_ms, 3),
        "target_forward_ms": round(forward_ms, 2),
        "draft_cost_ratio": round(draft_ms / forward_ms, 4) if forward_ms else None,
        "speedup": round(tot["plain_s"] / tot["spec_s"], 3) if tot["spec_s"] else None,
        "rows": rows,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaspec.train.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--checkpoint", default=None, help="draft-head checkpoint (default: the shipped one)")
    parser.add_argument("--domains", default="python,rust")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "int8"), help="target dtype")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args(argv)

    import torch

    from adaspec.speculators.draft_head import load_static_speculator
    from adaspec.target import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.model, dtype=args.dtype)
    spec = load_static_speculator(target, args.checkpoint)
    result = {"model": args.model, "dtype": args.dtype, "checkpoint": args.checkpoint or "shipped",
              "torch_threads": torch.get_num_threads()}
    for domain in [d.strip() for d in args.domains.split(",") if d.strip()]:
        result[domain] = measure(target, spec, heldout_prompts(domain, args.num_prompts), args.max_tokens,
                                 args.lookahead)
        summary = {k: v for k, v in result[domain].items() if k != "rows"}
        print(f"{domain}: {json.dumps(summary)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
