"""``adaspec bench rl``: GRPO rollouts with a policy that changes every round.

Each round samples B prompts x G completions at temperature 1 from the
served policy with every system, trains the policy on one system's samples
(a GRPO step), and pushes the new weights into the running target
(:meth:`adaspec.engine.Engine.update_weights`: int8 re-quantized with the
initial calibration; no restart). The speculators learn across rounds.

Task (GSM8K-style, verifiable, rewards vary within a group): one-step word
problems with small numbers through the chat template, asking for a short
explanation that ends with "Answer: N"; reward = 1 if the last integer of the
completion is the answer, plus 0.2 if it has the "Answer:" format. A 135M
model gets some right and writes the format sometimes, so groups are mixed,
and completions stay tens of tokens long (no length bonus: a policy that
learned to stop at once would leave nothing to decode).

Trainer: a minimal GRPO update (DeepSeekMath, Shao et al. 2024, arXiv
2402.03300) in fp32 on the transformers model: group-normalised advantages
``A_i = (r_i - mean_g r) / (std_g r + 1e-4)``, one on-policy step per round
(the importance ratio is 1, so the clipped objective is the policy gradient
``-mean_i A_i * mean_t log pi(c_it)``), Adam, no KL penalty (the KL to the
initial policy is *reported*, so the drift is visible). TRL's ``GRPOTrainer``
drives adaspec the same way through :mod:`adaspec.trl` (``scripts/trl_grpo.py``);
this harness keeps its own step so every system is timed on the same policy.

Systems, all on one target (the same weights, updated once per round):

- ``plain``: plain decoding, the G samples one after another;
- ``plain-batched``: plain decoding, the group's samples in one forward per token;
- ``suffix``: the suffix speculator alone (fixed lookahead), sequential
  (with ``--sampled-suffix`` its drafts, and atlas's, are draws from the
  stored continuation frequencies, returned as ``draft_probs``, so rejection
  sampling accepts ``sum_x min(target(x), freq(x))`` per token);
- ``atlas``: the confidence-aware controller (draft head + suffix), sequential;
- ``atlas-batched``: atlas with the group's samples stepping together.

Per round and system: rollout tokens/s (completion tokens / wall time of the
round's rollouts, prefill included), acceptance rate, mean acceptance
length; per round: the reward, the KL of the rollout policy to the initial
one, the int8-vs-fp32 logprob mismatch (mean |log p_int8 - log p_fp32| and
KL per token, both on the sampled tokens; KL by the k3 estimator
``r - 1 - log r``, ``r = p_fp32 / p_int8``), the update's seconds.
``--dtype float32`` rolls out on fp32 weights (exact logprobs, slower).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from adaspec import config
from adaspec.engine import Engine
from adaspec.rollout import RolloutGroup, rollout
from adaspec.types import SamplingParams

SYSTEMS = ("plain", "plain-batched", "suffix", "atlas", "atlas-batched")
TRAIN_SYSTEM = "plain"  # whose samples the trainer learns from (all are draws of the same policy)


@dataclass
class SystemRound:
    """One system's rollouts in one round."""

    system: str
    tokens: int
    seconds: float
    tokens_per_s: float
    acceptance_rate: Optional[float]
    mean_acceptance_length: Optional[float]
    draft_s: float = 0.0  # drafting and deciding, summed over the samples
    verify_s: float = 0.0  # verify forwards (a batched forward's time split over its samples)
    target_forwards: int = 0  # per sample, summed


@dataclass
class RoundRecord:
    """One round: every system's rollouts, then the trainer's step and the weight update."""

    round: int
    policy_version: int
    systems: dict[str, SystemRound] = field(default_factory=dict)
    reward_mean: float = 0.0
    reward_correct: float = 0.0
    groups_with_mixed_rewards: int = 0
    kl_to_initial: float = 0.0
    logprob_abs_diff: float = 0.0
    logprob_kl: float = 0.0
    update_s: float = 0.0
    train_s: float = 0.0


_PROBLEMS = (
    ("Tom has {a} apples and buys {b} more. How many apples does he have now?", lambda a, b: a + b),
    ("A box holds {a} pens. Sara adds {b} pens. How many pens are in the box?", lambda a, b: a + b),
    ("Lena had {a} stickers and gave away {b}. How many stickers does she have left?", lambda a, b: a - b),
    ("There are {a} birds on a tree and {b} more land on it. How many birds are on the tree?", lambda a, b: a + b),
)
FORMAT = " Explain briefly, then end with 'Answer: N'."


def arithmetic_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (question, answer) pairs: one-step word problems with numbers 2..20 (differences >= 0)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text, fn = _PROBLEMS[(seed + i) % len(_PROBLEMS)]
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        a, b = max(a, b), min(a, b)
        out.append((text.format(a=a, b=b) + FORMAT, fn(a, b)))
    return out


def reward(text: str, answer: int) -> tuple[float, bool]:
    """``(reward, correct)``: 1 if the last integer of ``text`` is ``answer``, + 0.2 for an "Answer:" in it."""
    nums = re.findall(r"-?\d+", text)
    correct = bool(nums) and int(nums[-1]) == answer
    return float(correct) + (0.2 if "answer:" in text.lower() else 0.0), correct


def _acceptance(groups: Sequence[RolloutGroup]) -> tuple[Optional[float], Optional[float]]:
    """Acceptance rate = accepted / proposed; mean acceptance length = emitted / target forwards
    on steps with a draft (recovered or bonus token included)."""
    proposed = sum(s.stats.proposed for g in groups for s in g.samples)
    accepted = sum(s.stats.accepted for g in groups for s in g.samples)
    steps = sum(s.stats.draft_steps for g in groups for s in g.samples)
    emitted = sum(s.stats.emitted_on_draft_steps for g in groups for s in g.samples)
    return (accepted / proposed if proposed else None), (emitted / steps if steps else None)


def _sequence_logprobs(model, prompt_ids: list[int], completions: list[list[int]], grad: bool) -> list[torch.Tensor]:
    """fp32 log pi(c_t | prompt, c_<t) for each completion of one prompt: ``[len(c)]`` each."""
    L = max(len(c) for c in completions)
    pad = 0
    ids = torch.tensor([prompt_ids + c + [pad] * (L - len(c)) for c in completions])  # [G, P + L]
    mask = torch.tensor([[1] * (len(prompt_ids) + len(c)) + [0] * (L - len(c)) for c in completions])
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, len(prompt_ids) - 1:-1].float()  # [G, L, V]
        lp = torch.log_softmax(logits, -1)
        tok = ids[:, len(prompt_ids):]
        picked = lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # [G, L]
    return [picked[i, :len(c)] for i, c in enumerate(completions)]


def run_rl(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the summary (and writes ``rl.jsonl`` / ``rl.md`` under ``args.out``)."""
    from transformers import AutoModelForCausalLM

    from adaspec.controller import FixedController
    from adaspec.models import resolve_model
    from adaspec.speculators.suffix import SuffixSpeculator

    torch.manual_seed(args.seed)
    cfg = config.EngineConfig(model=args.model, dtype=args.dtype, speculator="atlas", lookahead=args.lookahead,
                              max_model_len=args.max_model_len, threads=args.threads, runtime=args.runtime)
    target = config.load_config_target(cfg)

    def suffix() -> SuffixSpeculator:
        if args.sampled_suffix:
            return SuffixSpeculator(sample_drafts=True, vocab_size=target.vocab_size)
        return SuffixSpeculator()

    def atlas() -> Engine:  # config.build_controller's atlas, with this run's suffix speculator
        from adaspec.controller import ConfidenceAwareController

        return Engine(target, controller=ConfidenceAwareController(
            static=config.static_speculator_or_none(target), adaptive=suffix(),
            cost_model=config.calibrated_cost_model(target), max_lookahead=cfg.effective_lookahead))

    engines = {
        "plain": Engine(target, []),
        "plain-batched": Engine(target, []),
        "suffix": Engine(target, controller=FixedController(suffix(), args.suffix_lookahead)),
        "atlas": atlas(),
        "atlas-batched": atlas(),
    }
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            raise ValueError(f"unknown system {s!r}; choose from {SYSTEMS}")
    train_system = TRAIN_SYSTEM if TRAIN_SYSTEM in systems else systems[0]
    path = resolve_model(args.model)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy.train()
    initial = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    tasks = arithmetic_prompts(args.num_prompts, args.seed)
    tok = target.tokenizer
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[RoundRecord] = []
    for rnd in range(1, args.rounds + 1):
        batch = [tasks[((rnd - 1) * args.batch_prompts + i) % len(tasks)] for i in range(args.batch_prompts)]
        rec = RoundRecord(round=rnd, policy_version=engines["plain"].policy_version)
        train_groups: list[RolloutGroup] = []
        order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]  # who runs first rotates
        for name in order:
            eng = engines[name]
            t0 = time.perf_counter()
            groups = rollout(eng, [q for q, _ in batch], n=args.group_size, params=params, chat=True,
                             mode="batched" if name.endswith("-batched") else "sequential")
            dt = time.perf_counter() - t0
            ntok = sum(g.num_completion_tokens for g in groups)
            rate, length = _acceptance(groups)
            rec.systems[name] = SystemRound(name, ntok, dt, ntok / dt, rate, length,
                                            sum(s.stats.draft_time_s for g in groups for s in g.samples),
                                            sum(s.stats.verify_time_s for g in groups for s in g.samples),
                                            sum(s.stats.target_forwards for g in groups for s in g.samples))
            if name == train_system:
                train_groups = groups
        # ---- the trainer: rewards, advantages, one GRPO step (fp32)
        t0 = time.perf_counter()
        rewards, corrects, diffs, kls, kl0 = [], [], [], [], []
        opt.zero_grad()
        for (question, answer), g in zip(batch, train_groups):
            comps = [s.completion_ids for s in g.samples]
            r = []
            for s in g.samples:
                rv, ok = reward(tok.decode(s.completion_ids, skip_special_tokens=True), answer)
                r.append(rv)
                corrects.append(ok)
            rewards.extend(r)
            rt = torch.tensor(r)
            if rt.std() > 0:
                rec.groups_with_mixed_rewards += 1
            adv = (rt - rt.mean()) / (rt.std() + 1e-4)
            lp = _sequence_logprobs(policy, g.prompt_ids, comps, grad=True)
            with torch.no_grad():
                lp0 = _sequence_logprobs(initial, g.prompt_ids, comps, grad=False)
            group_loss = 0.0
            for s, lpi, lp0i, a in zip(g.samples, lp, lp0, adv):
                served = torch.tensor(s.logprobs)
                fp32 = lpi.detach()
                diffs.append((served - fp32).abs())
                ratio = torch.exp(fp32 - served)  # p_fp32 / p_served on tokens drawn from the served policy
                kls.append(ratio - 1 - torch.log(ratio))
                r0 = torch.exp(lp0i - fp32)  # p_initial / p_policy on tokens drawn from the policy
                kl0.append(r0 - 1 - torch.log(r0))
                group_loss = group_loss - (a * lpi.mean()) / (len(batch) * args.group_size)
            group_loss.backward()  # one backward per group: its forward was one batch
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        rec.train_s = time.perf_counter() - t0
        rec.reward_mean = sum(rewards) / len(rewards)
        rec.reward_correct = sum(corrects) / len(corrects)
        rec.logprob_abs_diff = float(torch.cat(diffs).mean())
        rec.logprob_kl = float(torch.cat(kls).mean())
        rec.kl_to_initial = float(torch.cat(kl0).mean())
        # ---- push the new weights into the running target (no restart)
        t0 = time.perf_counter()
        state = {k: v.detach() for k, v in policy.state_dict().items()}
        version = engines["plain"].update_weights(state)
        for name, eng in engines.items():
            if name != "plain":
                eng.notify_policy_update(version)
        rec.update_s = time.perf_counter() - t0
        records.append(rec)
        print(_round_line(rec, systems), flush=True)
        with open(out_dir / "rl.jsonl", "a" if rnd > 1 else "w") as f:
            f.write(json.dumps(asdict(rec)) + "\n")
    summary = summarize(records, systems, args)
    (out_dir / "rl.md").write_text(format_rl(records, systems, summary))
    return summary


def _round_line(rec: RoundRecord, systems: Sequence[str]) -> str:
    rates = " ".join(f"{s}={rec.systems[s].tokens_per_s:.1f}" for s in systems)
    return (f"round {rec.round}: tok/s {rates} | reward {rec.reward_mean:.3f} (correct {rec.reward_correct:.2f}) "
            f"KL0 {rec.kl_to_initial:.4f} |dlogp| {rec.logprob_abs_diff:.4f} KLq {rec.logprob_kl:.5f} "
            f"update {rec.update_s:.1f}s")


def summarize(records: Sequence[RoundRecord], systems: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's figures: atlas over sequential plain and over the best plain, from round 2 on."""
    out: dict[str, Any] = {"rounds": len(records), "batch_prompts": args.batch_prompts, "group_size": args.group_size,
                           "dtype": args.dtype, "max_tokens": args.max_tokens,
                           "sampled_suffix": getattr(args, "sampled_suffix", False)}
    atlas = [s for s in ("atlas", "atlas-batched") if s in systems]
    plains = [s for s in ("plain", "plain-batched") if s in systems]
    if not atlas or "plain" not in systems:
        return out
    rows = []
    for r in records:
        best_atlas = max(r.systems[s].tokens_per_s for s in atlas)
        best_plain = max(r.systems[s].tokens_per_s for s in plains)
        rows.append({"round": r.round, "atlas_over_plain": best_atlas / r.systems["plain"].tokens_per_s,
                     "atlas_over_best_plain": best_atlas / best_plain})
    later = rows[1:]
    out["per_round"] = rows
    if later:
        out["min_atlas_over_plain_from_round_2"] = min(x["atlas_over_plain"] for x in later)
        out["min_atlas_over_best_plain_from_round_2"] = min(x["atlas_over_best_plain"] for x in later)
        out["last_over_round_2_speedup"] = later[-1]["atlas_over_plain"] / later[0]["atlas_over_plain"]
        pooled = {}
        for s in systems:  # rounds 2.. pooled: total tokens / total seconds (less noisy than any one round)
            tokens = sum(r.systems[s].tokens for r in records[1:])
            seconds = sum(r.systems[s].seconds for r in records[1:])
            forwards = sum(r.systems[s].target_forwards for r in records[1:]) or 1
            pooled[s] = {"tokens_per_s": tokens / seconds if seconds else 0.0,
                         "tokens_per_forward": tokens / forwards,
                         "draft_ms_per_forward": 1000 * sum(r.systems[s].draft_s for r in records[1:]) / forwards,
                         "verify_ms_per_forward": 1000 * sum(r.systems[s].verify_s for r in records[1:]) / forwards}
        out["pooled_from_round_2"] = pooled
    out["kl_to_initial_last"] = records[-1].kl_to_initial
    out["reward_first_last"] = [records[0].reward_mean, records[-1].reward_mean]
    return out


def format_rl(records: Sequence[RoundRecord], systems: Sequence[str], summary: dict[str, Any]) -> str:
    """The per-round table (Markdown)."""
    head = ["round"] + [f"{s} tok/s" for s in systems] + ["atlas acc / len", "suffix acc / len", "reward",
                                                           "correct", "mixed groups", "KL to start",
                                                           "int8-fp32 abs dlogp", "int8-fp32 KL/token", "update s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def acc(r: RoundRecord, s: str) -> str:
        x = r.systems.get(s)
        if x is None or x.acceptance_rate is None:
            return "-"
        return f"{x.acceptance_rate:.2f} / {x.mean_acceptance_length:.2f}"

    for r in records:
        cells = [str(r.round)] + [f"{r.systems[s].tokens_per_s:.1f}" for s in systems]
        cells += [acc(r, "atlas"), acc(r, "suffix"), f"{r.reward_mean:.3f}", f"{r.reward_correct:.2f}",
                  str(r.groups_with_mixed_rewards), f"{r.kl_to_initial:.4f}", f"{r.logprob_abs_diff:.4f}",
                  f"{r.logprob_kl:.5f}", f"{r.update_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n```\n" + json.dumps({k: v for k, v in summary.items() if k != "per_round"},
                                                       indent=2) + "\n```\n"


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``adaspec bench rl``."""
    config.add_model_arguments(p)
    p.add_argument("--rounds", type=int, default=10, help="policy updates (default: %(default)s)")
    p.add_argument("--batch-prompts", type=int, default=1, help="prompts per round, B (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=1,
                   help="distinct prompts, cycled B per round (default: %(default)s: the same prompts every round, "
                        "as in several epochs over a small set)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion cap (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--lookahead", type=int, default=config.ATLAS_LOOKAHEAD, help="atlas's largest lookahead")
    p.add_argument("--suffix-lookahead", type=int, default=8, help="the suffix speculator's fixed lookahead")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list (default: all)")
    p.add_argument("--sampled-suffix", action=argparse.BooleanOptionalAction, default=False,
                   help="the suffix speculator draws its drafts from the stored continuation frequencies "
                        "(draft_probs) instead of taking the most frequent (default: %(default)s; BENCHMARKS.md, "
                        "issue 16 run 2: no gain for the suffix speculator, and atlas stopped drafting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/rl", help="output folder (default: %(default)s)")


def rl_from_args(args: argparse.Namespace) -> int:
    summary = run_rl(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_round"}, indent=2))
    return 0
