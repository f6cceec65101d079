"""What drafter-invariant (coupled) sampling costs in acceptance, against rejection sampling.

Seeded requests are verified with :func:`adaspec.verify.verify_coupled`,
unseeded ones with :func:`adaspec.verify.verify_stochastic`. For a speculator
without draft probabilities (suffix, n-gram) both accept a draft x with
probability ``target_probs[x]``, so coupling should cost nothing; for the draft
head (it samples its drafts) rejection sampling accepts with probability
``1 - TV`` per token, coupling with the verifier's noise at least
``(1 - TV) / (1 + TV)`` and an independent draft only ``sum_x draft(x) target(x)``.

Rows: one speculator, one temperature, one rule, over the same prompts and a
fixed lookahead (the controller is taken out of the comparison)::

    acceptance rate        = accepted / proposed draft tokens
    mean acceptance length = tokens emitted on draft steps / draft steps

Run: ``python -m adaspec.bench.coupled_cost --prompts-per-domain 2 --max-tokens 64``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

from adaspec.prompts import load_domain
from adaspec.engine import Engine
from adaspec.target import load_target
from adaspec.types import SamplingParams, SpeculationStats

RULES = ("rejection", "coupled", "coupled-independent-drafts")


@dataclass
class Row:
    speculator: str
    temperature: float
    rule: str
    proposed: int
    accepted: int
    draft_steps: int
    emitted_on_draft_steps: int
    tokens: int
    elapsed_s: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return self.emitted_on_draft_steps / self.draft_steps if self.draft_steps else 0.0


def _speculator(name: str, target):
    if name == "suffix":
        from adaspec.speculators.suffix import SuffixSpeculator

        return SuffixSpeculator()
    if name == "ngram":
        from adaspec.speculators import NgramSpeculator

        return NgramSpeculator()
    if name == "draft_head":
        from adaspec.speculators.draft_head import load_static_speculator

        return load_static_speculator(target)
    raise ValueError(f"unknown speculator {name!r}")


def run(target, prompts: list[list[int]], speculator: str, temperature: float, rule: str, lookahead: int,
        max_tokens: int, seed: int) -> Row:
    """One row: the same prompts, a fresh speculator (learned state starts empty for every row)."""
    spec = _speculator(speculator, target)
    if rule == "coupled-independent-drafts":
        if not hasattr(spec, "couple_seeded"):
            raise ValueError(f"{speculator} has no independent draft sampler")
        spec.couple_seeded = False
    engine = Engine(target, [spec], lookahead=lookahead)
    total = SpeculationStats()
    tokens = 0
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        # Unseeded requests take their generator seed from os.urandom: rejection sampling, fresh draws.
        req_seed = None if rule == "rejection" else seed * 1000 + i
        r = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=req_seed))
        s = r.speculation
        total.proposed += s.proposed
        total.accepted += s.accepted
        total.draft_steps += s.draft_steps
        total.emitted_on_draft_steps += s.emitted_on_draft_steps
        tokens += len(r.token_ids)
    return Row(speculator, temperature, rule, total.proposed, total.accepted, total.draft_steps,
               total.emitted_on_draft_steps, tokens, time.perf_counter() - t0)


def table(rows: list[Row]) -> str:
    out = ["| speculator | temperature | rule | proposed | acceptance rate | mean acceptance length | tokens |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.speculator} | {r.temperature:g} | {r.rule} | {r.proposed} | {r.acceptance_rate:.3f} | "
                   f"{r.mean_acceptance_length:.2f} | {r.tokens} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="int8", choices=["float32", "int8"])
    ap.add_argument("--domains", default="python,rust,chat,sql")
    ap.add_argument("--prompts-per-domain", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--temperatures", default="0.7,1.0")
    ap.add_argument("--speculators", default="suffix,ngram,draft_head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target(args.model, dtype=args.dtype)
    engine = Engine(target)
    prompts = []
    for d in args.domains.split(","):
        for p in load_domain(d)[: args.prompts_per_domain]:
            prompts.append(engine.apply_chat_template(p.messages))
    rows = []
    for name in args.speculators.split(","):
        for temp in (float(t) for t in args.temperatures.split(",")):
            for rule in RULES:
                if rule == "coupled-independent-drafts" and name != "draft_head":
                    continue
                rows.append(run(target, prompts, name, temp, rule, args.lookahead, args.max_tokens, args.seed))
                r = rows[-1]
                print(f"{name} T={temp:g} {rule}: acceptance {r.acceptance_rate:.3f}, "
                      f"MAL {r.mean_acceptance_length:.2f} ({r.elapsed_s:.0f} s)", flush=True)
    print()
    print(f"{len(prompts)} prompts ({args.domains}, {args.prompts_per_domain} each), {args.max_tokens} tokens, "
          f"k={args.lookahead}, {args.dtype}, pid {os.getpid()}")
    print(table(rows))


if __name__ == "__main__":
    main()
