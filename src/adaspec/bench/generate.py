"""`adaspec bench generate`: this engine vs transformers' generate(), same model and prompts.

Systems (one run, same weights, same precision, greedy):

- ``adaspec-plain``: this engine, no speculation;
- ``adaspec-ngram``: this engine with prompt lookup;
- ``hf-plain``: transformers ``model.generate()``;
- ``hf-prompt-lookup``: ``model.generate(prompt_lookup_num_tokens=N)``.

Systems run interleaved per prompt, in an order rotated per prompt, so slow
phases of the shared machine hit all of them alike. Greedy outputs of every
system are compared token by token with adaspec-plain.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from adaspec.bench.common import hf_generate as _hf_generate
from adaspec.engine import Engine
from adaspec.prompts import BenchPrompt
from adaspec.speculators import NgramSpeculator
from adaspec.target import TargetModel
from adaspec.types import SamplingParams


@dataclass
class Record:
    system: str
    domain: str
    prompt_id: str
    tokens: int
    seconds: float
    mean_acceptance_length: float
    matches_plain: Optional[bool]


def run_generate_bench(target: TargetModel, prompts: list[BenchPrompt], max_tokens: int = 96, lookahead: int = 8,
                       lookup_tokens: int = 10, systems: Optional[list[str]] = None,
                       progress: bool = True) -> list[Record]:
    """Run every system on every prompt; returns one Record per (system, prompt)."""
    plain = Engine(target)
    ngram = Engine(target, [NgramSpeculator()], lookahead=lookahead)
    params = SamplingParams(max_tokens=max_tokens)

    def ours(engine: Engine) -> Callable[[list[int]], tuple[list[int], float]]:
        def run(ids: list[int]) -> tuple[list[int], float]:
            r = engine.generate(ids, params)
            return r.token_ids, r.speculation.mean_acceptance_length
        return run

    all_systems: dict[str, Callable[[list[int]], tuple[list[int], float]]] = {
        "adaspec-plain": ours(plain),
        "adaspec-ngram": ours(ngram),
        "hf-plain": lambda ids: (_hf_generate(target, ids, max_tokens, 0), 0.0),
        "hf-prompt-lookup": lambda ids: (_hf_generate(target, ids, max_tokens, lookup_tokens), 0.0),
    }
    names = systems or list(all_systems)
    unknown = set(names) - set(all_systems)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {sorted(all_systems)}")
    # Warm-up (first forward allocates).
    plain.generate(plain.apply_chat_template(prompts[0].messages), SamplingParams(max_tokens=4))
    records: list[Record] = []
    from tqdm import tqdm

    for i, p in enumerate(tqdm(prompts, desc="bench generate", disable=not progress)):
        ids = plain.apply_chat_template(p.messages)
        order = names[i % len(names):] + names[: i % len(names)]
        outs: dict[str, list[int]] = {}
        for name in order:
            t0 = time.perf_counter()
            toks, mal = all_systems[name](ids)
            dt = time.perf_counter() - t0
            outs[name] = toks
            records.append(Record(name, p.domain, p.prompt_id, len(toks), dt, mal, None))
        ref = outs.get("adaspec-plain")
        for rec in records[-len(order):]:
            if ref is not None:
                # HF's generate may stop one token later/earlier on EOS handling; compare the common length.
                got = outs[rec.system]
                n = min(len(got), len(ref))
                rec.matches_plain = got[:n] == ref[:n]
    return records


def summarize(records: list[Record]) -> str:
    """Markdown table: tokens/s per system per domain and overall, speedup over adaspec-plain."""
    systems = list(dict.fromkeys(r.system for r in records))
    domains = list(dict.fromkeys(r.domain for r in records))

    def tps(sys_: str, dom: Optional[str]) -> float:
        rs = [r for r in records if r.system == sys_ and (dom is None or r.domain == dom)]
        secs = sum(r.seconds for r in rs)
        return sum(r.tokens for r in rs) / secs if secs else 0.0

    cols = domains + ["all"]
    lines = ["| system | " + " | ".join(f"{c} tok/s" for c in cols) + " | speedup (all) | mean acc. len | greedy = plain |",
             "|---|" + "---|" * (len(cols) + 3)]
    base = tps("adaspec-plain", None) if "adaspec-plain" in systems else None
    for s in systems:
        vals = [tps(s, d) for d in domains] + [tps(s, None)]
        rs = [r for r in records if r.system == s]
        mal = [r.mean_acceptance_length for r in rs if r.mean_acceptance_length]
        mal_s = f"{sum(mal) / len(mal):.2f}" if mal else "-"
        eq = sum(1 for r in rs if r.matches_plain)
        speed = f"{vals[-1] / base:.2f}x" if base else "-"
        lines.append(f"| {s} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {speed} | {mal_s} | {eq}/{len(rs)} |")
    return "\n".join(lines)


def write_jsonl(records: list[Record], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
