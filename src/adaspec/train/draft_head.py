"""Train a draft head (``adaspec.speculators.draft_head``) for a target model.

Pipeline (each stage resumable from ``out_dir``):

1. **data** (:mod:`adaspec.train.data`): target features over a broad corpus,
   teacher-forced or captured while the target answers prompts itself.
2. **draft vocabulary**: the ``draft_vocab_size`` target tokens seen most often
   in the training split (as tokens or as the target's greedy choice), EOS
   always included (FR-Spec / EAGLE-3).
3. **training**: an unrolled chain of ``unroll`` head steps per sampled start
   position (EAGLE-3's "training-time test": step j reads the head's own
   feature from step j - 1, so training sees the errors drafting sees). Loss
   per step: ``KL(p_target || q_draft)`` over the draft vocabulary (the target
   distribution restricted to it and renormalised) plus ``feature_loss_weight``
   times EAGLE's smooth-L1 feature regression against the target's feature.
4. **held-out evaluation** (:func:`evaluate_head`): top-1 agreement with the
   target and the greedy mean acceptance length of simulated chains.
5. **export**: ``out_dir/draft_head.safetensors`` (fp16) and ``report.json``.

The time budget bounds the training loop (data stages are sized by the plan);
the learning-rate schedule follows whichever of steps and time runs out first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from adaspec.speculators.draft_head import (
    DraftHeadNet,
    context_successors,
    new_draft_head,
    save_draft_head,
    successor_inputs,
    target_embedding_weight,
)
from adaspec.train.data import DataPlan, FeatureDoc, build_features, iter_split

STATE_FILE = "train_state.pt"
CHECKPOINT_FILE = "draft_head.safetensors"
REPORT_FILE = "report.json"


@dataclass
class TrainConfig:
    """Everything a training run depends on (defaults: the shipped head's run).

    Attributes:
        model: target model name or path.
        out_dir: where shards, training state, checkpoint and report go.
        data: the corpus plan (sources and sizes).
        draft_vocab_size: Vd. Default 8192.
        intermediate_size / num_blocks / context_ngram: head shape. Defaults 1536 / 1 / 3.
        steps: most optimizer steps. Default 3000.
        time_budget_s: most seconds in the training loop; None = no limit.
        batch_size: start positions per step. Default 128.
        unroll: chained head steps per start position. Default 4.
        lr: peak AdamW learning rate (cosine decay to 10%). Default 1e-3.
        warmup_steps: linear warm-up. Default 50.
        weight_decay: AdamW weight decay. Default 0.0.
        feature_loss_weight: weight of the smooth-L1 feature regression. Default 0.1.
        label_top_k: the KL uses the target's top K draft-vocabulary
            probabilities, precomputed once (0 = the exact distribution,
            recomputed every step). Default 32.
        eval_every: steps between held-out evaluations (0 = only at the end). Default 500.
        checkpoint_every_s: seconds between resumable checkpoints. Default 60.
        eval_max_positions: held-out start positions evaluated. Default 4096.
        seed: RNG seed. Default 0.
        threads: torch intra-op threads (None = leave as is).
        resume: continue from the state in ``out_dir``.
        progress: show tqdm bars.
    """

    model: str = "smollm2-135m-instruct"
    out_dir: str = "draft-head-run"
    data: DataPlan = field(default_factory=DataPlan)
    draft_vocab_size: int = 8192
    intermediate_size: int = 1536
    num_blocks: int = 1
    context_ngram: int = 3
    steps: int = 3000
    time_budget_s: Optional[float] = None
    batch_size: int = 128
    unroll: int = 4
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    feature_loss_weight: float = 0.1
    label_top_k: int = 32
    eval_every: int = 500
    checkpoint_every_s: float = 60.0
    eval_max_positions: int = 4096
    seed: int = 0
    threads: Optional[int] = None
    resume: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        checkpoint: path of the exported head.
        report: the held-out evaluation and run notes (also in ``report.json``).
    """

    checkpoint: Path
    report: dict


# ---------------------------------------------------------------- tensors for training
@dataclass
class PackedDocs:
    """Documents concatenated for random access.

    Attributes:
        token_ids: ``[N]`` int64.
        hidden: ``[N, H]`` float16 (row t predicts token t + 1 of its document).
        target_argmax: ``[N]`` int64.
        target_lse: ``[N]`` float32.
        doc_end: ``[N]`` int64, one past the last position of each position's document.
        starts: ``[M]`` int64, valid chain starts (positions >= 1 inside their document).
        source: ``[N]`` int64 index into ``sources``.
        sources: source names.
        successor / match_length: ``[N]`` int64 context successor of each
            position within its document (-1 / 0 when none).
        generated: ``[N]`` bool, positions whose token the target generated
            (the answer part of self-distilled documents).
    """

    token_ids: torch.Tensor
    hidden: torch.Tensor
    target_argmax: torch.Tensor
    target_lse: torch.Tensor
    doc_end: torch.Tensor
    starts: torch.Tensor
    source: torch.Tensor
    sources: list[str]
    successor: torch.Tensor
    match_length: torch.Tensor
    generated: torch.Tensor


def pack(docs: Sequence[FeatureDoc], context_ngram: int = 3) -> PackedDocs:
    """Concatenate documents (at least one with two or more positions)."""
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise ValueError("no document with at least two positions to train or evaluate on")
    sources = sorted({d.source for d in docs})
    ends, starts, src, succ, match, gen = [], [], [], [], [], []
    offset = 0
    for d in docs:
        n = len(d)
        ends.append(torch.full((n,), offset + n, dtype=torch.long))
        starts.append(torch.arange(offset + 1, offset + n))
        src.append(torch.full((n,), sources.index(d.source), dtype=torch.long))
        s_ids, s_len = context_successors(d.token_ids.tolist(), context_ngram)
        succ.append(torch.tensor(s_ids, dtype=torch.long))
        match.append(torch.tensor(s_len, dtype=torch.long))
        gen.append(torch.arange(n) >= (d.num_prompt_tokens if d.num_prompt_tokens else n))
        offset += n
    return PackedDocs(
        token_ids=torch.cat([d.token_ids for d in docs]).long(),
        hidden=torch.cat([d.hidden for d in docs]),
        target_argmax=torch.cat([d.target_argmax for d in docs]).long(),
        target_lse=torch.cat([d.target_lse for d in docs]).float(),
        doc_end=torch.cat(ends),
        starts=torch.cat(starts),
        source=torch.cat(src),
        sources=sources,
        successor=torch.cat(succ),
        match_length=torch.cat(match),
        generated=torch.cat(gen),
    )


def choose_draft_vocab(docs: Sequence[FeatureDoc], size: int, vocab_size: int, always: Sequence[int] = ()) -> list[int]:
    """The ``size`` most frequent target tokens of ``docs`` (tokens and greedy choices).

    ``always`` ids (e.g. EOS) come first; when the corpus has fewer distinct
    tokens than ``size``, the rest is filled with the smallest unused ids.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for d in docs:
        counts += torch.bincount(d.token_ids.long(), minlength=vocab_size)[:vocab_size]
        counts += torch.bincount(d.target_argmax.long(), minlength=vocab_size)[:vocab_size]
    size = min(size, vocab_size)
    chosen = [int(t) for t in always if 0 <= int(t) < vocab_size][:size]
    seen = set(chosen)
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    for t in order:
        if len(chosen) >= size:
            break
        if t not in seen and counts[t] > 0:
            chosen.append(t)
            seen.add(t)
    for t in range(vocab_size):
        if len(chosen) >= size:
            break
        if t not in seen:
            chosen.append(t)
            seen.add(t)
    return chosen


# ---------------------------------------------------------------- loss
@dataclass
class TargetLabels:
    """The target's distribution over the draft vocabulary, its top K per position.

    Computed once before training (the draft LM head is frozen), so a training
    step does not recompute the target's draft-vocabulary logits.

    Attributes:
        top_ids: ``[N, K]`` int64 draft ids, most likely first.
        top_probs: ``[N, K]`` float32 target probabilities (over the draft
            vocabulary), renormalised over the K.
    """

    top_ids: torch.Tensor
    top_probs: torch.Tensor


@torch.no_grad()
def target_labels(net: DraftHeadNet, packed: PackedDocs, top_k: int, rows: int = 2048) -> TargetLabels:
    """Top-``top_k`` target probabilities over the draft vocabulary at every position of ``packed``."""
    k = min(top_k, net.config.draft_vocab_size)
    ids, probs = [], []
    for i in range(0, packed.hidden.shape[0], rows):
        p = torch.softmax(net.logits(packed.hidden[i : i + rows].float()), dim=-1)  # [rows, Vd]
        top = torch.topk(p, k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values / top.values.sum(-1, keepdim=True))
    return TargetLabels(top_ids=torch.cat(ids), top_probs=torch.cat(probs))


def chain_loss(net: DraftHeadNet, embed: torch.Tensor, packed: PackedDocs, starts: torch.Tensor, unroll: int,
               feature_loss_weight: float, labels: Optional[TargetLabels] = None) -> tuple[torch.Tensor, dict]:
    """Loss of ``unroll`` chained head steps from each start position.

    Step j (1-based) from start s reads the feature that predicted token
    ``s + j - 1`` (the target's at j = 1, the head's own afterwards) and that
    token's embedding, and is scored against the target at position
    ``s + j - 1``. Steps past the end of the document are masked.

    Args:
        net: the head (train mode).
        embed: ``[V, H]`` float32 target embeddings.
        packed: the training documents.
        starts: ``[B]`` int64 start positions (each >= 1 inside its document).
        unroll: chained steps.
        feature_loss_weight: weight of the smooth-L1 term.
        labels: precomputed top-K target distributions (default: the exact
            draft-vocabulary distribution, recomputed from the target's feature).

    Returns:
        ``(loss, stats)``; stats hold per-step KL and top-1 agreement.
    """
    N = packed.token_ids.shape[0]
    feature = packed.hidden[starts - 1].float()  # [B, H]
    end = packed.doc_end[starts]  # [B]
    total = torch.zeros(())
    stats: dict[str, list[float]] = {"kl": [], "top1": []}
    for j in range(unroll):
        pos = starts + j  # [B] the position whose feature step j predicts
        valid = (pos < end).float()  # [B]
        pos = pos.clamp(max=N - 1)
        if valid.sum() == 0:
            break
        feature = net(feature, embed[packed.token_ids[pos]],
                      successor_inputs(embed, packed.successor[pos], packed.match_length[pos]),
                      packed.match_length[pos])  # [B, H]
        target_feature = packed.hidden[pos].float()  # [B, H]
        draft_logp = torch.log_softmax(net.logits(feature), dim=-1)  # [B, Vd]
        if labels is None:
            with torch.no_grad():
                target_logp = torch.log_softmax(net.logits(target_feature), dim=-1)  # [B, Vd]
            kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)  # [B]
        else:
            p = labels.top_probs[pos]  # [B, K]
            kl = (p * (p.clamp_min(1e-12).log() - draft_logp.gather(1, labels.top_ids[pos]))).sum(-1)  # [B]
        reg = F.smooth_l1_loss(feature, target_feature, reduction="none").mean(-1)  # [B]
        denom = valid.sum()
        total = total + ((kl + feature_loss_weight * reg) * valid).sum() / denom
        with torch.no_grad():
            agree = (net.draft_to_target[draft_logp.argmax(-1)] == packed.target_argmax[pos]).float()
            stats["kl"].append(float((kl * valid).sum() / denom))
            stats["top1"].append(float((agree * valid).sum() / denom))
    return total / unroll, stats


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_head(net: DraftHeadNet, embed: torch.Tensor, packed: PackedDocs, max_k: int = 8,
                  max_positions: int = 4096, seed: int = 0) -> dict:
    """Held-out numbers of a head, by greedy chain simulation.

    For each start s (a sample of at most ``max_positions``), the head drafts
    ``d_1..d_k`` exactly as :class:`DraftHeadSpeculator` does under greedy
    decoding, from the target's feature at ``s - 1`` and token ``s``. Draft j
    is accepted when it equals the target's greedy token after position
    ``s + j - 1`` and every earlier draft was accepted; the chain can only be
    checked while the document itself continues with the accepted tokens
    (always true for the target's own greedy answers; elsewhere the check
    stops, so the estimate is conservative).

    - ``top1``: P(d_1 == target's greedy token) (top-1 agreement).
    - ``acceptance_length[k]``: mean over starts of 1 + accepted drafts with
      lookahead k, i.e. the engine's mean acceptance length (tokens emitted
      per target forward on steps with a draft) under greedy decoding.
    - ``in_draft_vocab``: fraction of the target's greedy tokens inside the
      draft vocabulary (an upper bound on ``top1``).
    - ``draft_vocab_mass``: mean target probability mass on the draft vocabulary.

    Returns:
        ``{"overall": {...}, "by_source": {name: {...}}}``, plus ``answers`` and
        ``answers_by_source`` over the positions the target generated itself
        (the traffic a static speculator drafts for).
    """
    net.eval()
    starts = packed.starts
    if starts.numel() > max_positions:
        g = torch.Generator().manual_seed(seed)
        starts = starts[torch.randperm(starts.numel(), generator=g)[:max_positions]].sort().values
    N = packed.token_ids.shape[0]
    end = packed.doc_end[starts]
    feature = packed.hidden[starts - 1].float()  # [S, H]
    token = packed.token_ids[starts]  # [S]
    alive = torch.ones(starts.shape[0], dtype=torch.bool)  # all drafts so far accepted and checkable
    accepted = torch.zeros(starts.shape[0], max_k + 1, dtype=torch.long)  # [S, k] accepted with lookahead k
    top1 = None
    in_vocab_mask = torch.zeros(int(net.config.target_vocab_size), dtype=torch.bool)
    in_vocab_mask[net.draft_to_target] = True
    for j in range(max_k):
        pos = (starts + j).clamp(max=N - 1)
        checkable = alive & (starts + j < end)
        # While the chain is alive its tokens are the document's, so the
        # document's context successors are the ones drafting would see.
        feature = net(feature, embed[token], successor_inputs(embed, packed.successor[pos], packed.match_length[pos]),
                      packed.match_length[pos])  # [S, H]
        draft = net.draft_to_target[net.logits(feature).argmax(-1)]  # [S]
        ok = checkable & (draft == packed.target_argmax[pos])
        if j == 0:
            top1 = ok.float()
        # The chain continues only where the document continues with the accepted draft.
        nxt = (starts + j + 1).clamp(max=N - 1)
        alive = ok & (starts + j + 1 < end) & (packed.token_ids[nxt] == draft)
        accepted[:, j + 1] = accepted[:, j] + ok.long()
        # Once a draft fails, later ones never count: ok is False for dead chains.
        token = draft
    acc_len = {k: (1.0 + accepted[:, k].float()) for k in range(1, max_k + 1)}
    first = packed.target_argmax[starts]  # the greedy token d_1 must match
    in_vocab = in_vocab_mask[first].float()
    logits_first = packed.hidden[starts].float() @ net.lm_head.t()  # [S, Vd]
    mass = torch.exp(torch.logsumexp(logits_first, -1) - packed.target_lse[starts])

    def summary(sel: torch.Tensor) -> dict:
        if sel.sum() == 0:
            return {}
        return {
            "positions": int(sel.sum()),
            "top1": round(float(top1[sel].mean()), 4),
            "in_draft_vocab": round(float(in_vocab[sel].mean()), 4),
            "draft_vocab_mass": round(float(mass[sel].mean()), 4),
            "acceptance_length": {str(k): round(float(v[sel].mean()), 3) for k, v in acc_len.items()},
        }

    src = packed.source[starts]
    everything = torch.ones_like(src, dtype=torch.bool)
    answers = packed.generated[starts]
    out = {
        "overall": summary(everything),
        "by_source": {name: summary(src == i) for i, name in enumerate(packed.sources) if (src == i).any()},
    }
    if answers.any():
        out["answers"] = summary(answers)
        out["answers_by_source"] = {name: summary(answers & (src == i)) for i, name in enumerate(packed.sources)
                                    if (answers & (src == i)).any()}
    return out


# ---------------------------------------------------------------- the run
def _lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("resume", None)
    d.pop("progress", None)
    return d


def train_draft_head(cfg: TrainConfig, target: Any = None, log: Any = print) -> TrainResult:
    """Run the whole pipeline for ``cfg`` (see the module docstring).

    Args:
        cfg: the run's settings.
        target: an already loaded float32 target (default: load ``cfg.model``).
        log: where progress lines go.

    Returns:
        TrainResult with the exported checkpoint path and the report.

    Raises:
        FileExistsError: ``out_dir`` holds a previous run and ``resume`` is off.
        ValueError: an unknown data source, or a corpus without training positions.
    """
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    state_path = out / STATE_FILE
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if target is None:
        from adaspec.target import load_target

        target = load_target(cfg.model, dtype="float32")
    (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))

    t_start = time.perf_counter()
    docs, data_stats = build_features(target, cfg.data, out / "shards", show_progress=cfg.progress, log=log)
    train_docs, held_docs = iter_split(docs, "train"), iter_split(docs, "heldout")
    log(f"data: {data_stats['tokens']}")
    packed = pack(train_docs, cfg.context_ngram)
    held = pack(held_docs, cfg.context_ngram) if held_docs else None

    embed = target_embedding_weight(target).float()
    state = torch.load(state_path, weights_only=False) if cfg.resume and state_path.exists() else None
    if state is not None:
        vocab = state["draft_vocab"]
    else:
        vocab = choose_draft_vocab(train_docs, cfg.draft_vocab_size, target.vocab_size,
                                   always=sorted(target.eos_token_ids))
    net = new_draft_head(target, vocab, cfg.intermediate_size, cfg.num_blocks, cfg.context_ngram, seed=cfg.seed)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step, elapsed, history = 0, 0.0, []
    gen = torch.Generator().manual_seed(cfg.seed)
    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed_s"], state["history"]
        gen.set_state(state["rng"])
        log(f"resumed at step {step} ({elapsed:.0f} s trained)")
    log(f"head: {net.num_trainable_parameters() / 1e6:.2f}M trainable parameters, draft vocabulary {len(vocab)}, "
        f"{packed.starts.numel()} training positions")

    labels = target_labels(net, packed, cfg.label_top_k) if cfg.label_top_k > 0 else None

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed_s": elapsed,
                    "history": history, "rng": gen.get_state(), "draft_vocab": vocab}, tmp)
        tmp.replace(state_path)

    def progress_of() -> float:
        p = step / max(1, cfg.steps)
        if cfg.time_budget_s:
            p = max(p, elapsed / cfg.time_budget_s)
        return p

    net.train()
    last_ckpt = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=not cfg.progress)
    while progress_of() < 1.0:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step, progress_of())
        idx = torch.randint(0, packed.starts.numel(), (cfg.batch_size,), generator=gen)
        loss, st = chain_loss(net, embed, packed, packed.starts[idx], cfg.unroll, cfg.feature_loss_weight, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        bar.update(1)
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}", top1=f"{st['top1'][0]:.2f}")
        if step % 25 == 0:
            history.append({"step": step, "elapsed_s": round(elapsed, 1), "loss": round(loss_value, 4),
                            "kl": [round(x, 3) for x in st["kl"]], "top1": [round(x, 3) for x in st["top1"]]})
        if held is not None and cfg.eval_every and step % cfg.eval_every == 0:
            ev = evaluate_head(net, embed, held, max_positions=cfg.eval_max_positions)
            net.train()
            history.append({"step": step, "heldout": ev["overall"]})
            part = ev.get("answers") or ev["overall"]
            log(f"step {step}: held-out top1 {ev['overall']['top1']:.3f}; on target answers: top1 {part['top1']:.3f}, "
                f"acceptance length k=4 {part['acceptance_length']['4']:.2f}")
        if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s:
            save_state()
            last_ckpt = time.perf_counter()
    bar.close()
    save_state()

    report: dict[str, Any] = {
        "model": cfg.model,
        "config": _config_dict(cfg),
        "data": data_stats,
        "steps": step,
        "train_s": round(elapsed, 1),
        "wall_s_this_session": round(time.perf_counter() - t_start, 1),
        "trainable_parameters": net.num_trainable_parameters(),
        "torch_threads": torch.get_num_threads(),
    }
    if history:
        report["last_train"] = next((h for h in reversed(history) if "loss" in h), None)
    if held is not None:
        report["heldout"] = evaluate_head(net, embed, held, max_positions=cfg.eval_max_positions)
        log("held-out: " + json.dumps(report["heldout"]["overall"]))
        if "answers" in report["heldout"]:
            log("held-out target answers: " + json.dumps(report["heldout"]["answers"]))
    ckpt = save_draft_head(net, out / CHECKPOINT_FILE, training={
        k: report[k] for k in ("model", "steps", "train_s", "data") if k in report
    } | {"heldout": report.get("heldout", {}).get("overall", {}),
         "heldout_answers": report.get("heldout", {}).get("answers", {})})
    (out / REPORT_FILE).write_text(json.dumps(report | {"history": history}, indent=2))
    log(f"wrote {ckpt} ({os.path.getsize(ckpt) / 1e6:.1f} MB)")
    return TrainResult(checkpoint=ckpt, report=report)


def main(argv: Optional[list[str]] = None) -> int:
    from adaspec.train.cli import add_train_arguments, train_from_args

    parser = argparse.ArgumentParser(prog="python -m adaspec.train.draft_head", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return train_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
