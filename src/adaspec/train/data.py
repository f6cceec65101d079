"""Training data for the draft head: documents, target features, and shards on disk.

A **feature document** is one token sequence with what the target computed at
every position, teacher-forced (one forward, no KV cache) or captured while the
target generated it (self-distillation: the target's own answers, the traffic
a static speculator sees):

- ``token_ids[t]``: the token at position t (every token was fed to the target);
- ``hidden[t]``: the target's last-layer hidden state after the final norm at
  position t, i.e. the feature that predicts token t + 1 (fp16);
- ``target_lse[t]``: log-sum-exp of the target's full-vocabulary logits there,
  so ``log p_target(v) = hidden[t] @ lm_head[v] - target_lse[t]``;
- ``target_argmax[t]``: the target's greedy next token there.

Sources (``--data``, comma-separated):

- ``chat``: MT-bench and Spec-Bench first turns (shared prompt sets), answered
  by the target itself (greedy, chat template);
- ``humaneval``: HumanEval tasks with even index < 120: the prompt in the
  benchmark's chat format answered by the target, plus prompt + canonical
  solution as raw code. Every other task is held out;
- ``stdlib``: chunks of this Python's standard-library source;
- a path: a ``.jsonl`` (``text`` rows are teacher-forced; ``messages`` or
  ``prompt`` rows are answered by the target), or a folder / file of
  ``.py``, ``.md`` or ``.txt`` text.

Rust, SQL and tool-call data are deliberately not sources: the drift benchmark
measures how the static speculator fares on traffic it never saw.

Work is cut into **units** (one generation batch or one teacher-forcing batch);
each unit writes one shard file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from adaspec.prompts import load_chat, load_python, prompts_root, read_jsonl

HUMANEVAL_TRAIN_LIMIT = 120  # tasks with even index below this are training data

# log-sum-exp / argmax over the full vocabulary are computed this many
# positions at a time (a [rows, V] fp32 block; 256 x 49152 is 50 MB).
_LOGIT_ROWS = 256


@dataclass
class FeatureDoc:
    """One sequence with the target's features (see the module docstring).

    Attributes:
        source: data source name (``chat``, ``humaneval``, ``stdlib``, a path).
        doc_id: stable id within the source.
        split: ``train`` or ``heldout``.
        token_ids: ``[T]`` int64.
        hidden: ``[T, H]`` float16; row t predicts token t + 1.
        target_lse: ``[T]`` float32.
        target_argmax: ``[T]`` int64.
        num_prompt_tokens: leading tokens that were a prompt (0 for raw text).
    """

    source: str
    doc_id: str
    split: str
    token_ids: torch.Tensor
    hidden: torch.Tensor
    target_lse: torch.Tensor
    target_argmax: torch.Tensor
    num_prompt_tokens: int = 0

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class WorkItem:
    """One document to produce: ``prompt_ids`` to answer, or ``token_ids`` to teacher-force."""

    source: str
    doc_id: str
    split: str
    token_ids: list[int]
    generate: bool


@dataclass
class WorkUnit:
    """A batch of work items that writes one shard ``<name>.pt``."""

    name: str
    items: list[WorkItem]
    generate: bool
    temperature: float = 0.0


@dataclass
class DataPlan:
    """Sizes of the corpus (the defaults are the shipped head's)."""

    sources: list[str] = field(default_factory=lambda: ["chat", "humaneval", "stdlib"])
    num_chat: int = 48
    num_humaneval: int = 60
    humaneval_samples: int = 0
    stdlib_tokens: int = 40_000
    heldout_chat: int = 6
    heldout_humaneval: int = 6
    heldout_stdlib_tokens: int = 2_048
    max_new_tokens: int = 160
    chunk_len: int = 256
    gen_batch_size: int = 16
    tf_batch_size: int = 8
    sample_temperature: float = 0.8
    seed: int = 0


# ---------------------------------------------------------------- sources
def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _chat_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chunks(ids: list[int], chunk_len: int) -> list[list[int]]:
    """Split into chunks of ``chunk_len`` (a tail shorter than 16 tokens is dropped)."""
    return [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len) if len(ids[i : i + chunk_len]) >= 16]


def _prompts_root() -> Path:
    """The full prompt sets: the splits below index all 164 HumanEval tasks, not the shipped subset."""
    return prompts_root(shipped=False)


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def chat_items(tokenizer: Any, plan: DataPlan) -> list[WorkItem]:
    """MT-bench + Spec-Bench first turns; every 10th prompt is held out."""
    prompts = load_chat(_prompts_root())
    train = [p for i, p in enumerate(prompts) if i % 10 != 5]
    held = [p for i, p in enumerate(prompts) if i % 10 == 5]
    out = [WorkItem("chat", p.prompt_id, "train", _chat_ids(tokenizer, p.messages), True)
           for p in _spread(train, plan.num_chat)]
    out += [WorkItem("chat", p.prompt_id, "heldout", _chat_ids(tokenizer, p.messages), True)
            for p in _spread(held, plan.heldout_chat)]
    return out


def humaneval_split(index: int) -> str:
    """``train`` for tasks with even index < 120, else ``heldout``."""
    return "train" if index % 2 == 0 and index < HUMANEVAL_TRAIN_LIMIT else "heldout"


def humaneval_items(tokenizer: Any, plan: DataPlan) -> list[WorkItem]:
    """Training tasks answered by the target and as raw code; a few held-out tasks answered.

    Held-out answers come from odd-index tasks below 120, so tasks 120..163
    stay untouched for benchmarks.
    """
    root = _prompts_root()
    prompts = load_python(root)
    rows = read_jsonl(root / "humaneval" / "HumanEval.jsonl")
    train_idx = [i for i in range(len(rows)) if humaneval_split(i) == "train"][: plan.num_humaneval]
    held_idx = _spread([i for i in range(min(len(rows), HUMANEVAL_TRAIN_LIMIT)) if i % 2 == 1], plan.heldout_humaneval)
    out = []
    for i in train_idx:
        out.append(WorkItem("humaneval", prompts[i].prompt_id, "train", _chat_ids(tokenizer, prompts[i].messages), True))
    for i in train_idx:
        code = rows[i]["prompt"] + rows[i]["canonical_solution"]
        for j, c in enumerate(_chunks(list(tokenizer.encode(code, add_special_tokens=False)), plan.chunk_len)):
            out.append(WorkItem("humaneval", f"{rows[i]['task_id']}/code/{j}", "train", c, False))
    for i in held_idx:
        out.append(WorkItem("humaneval", prompts[i].prompt_id, "heldout", _chat_ids(tokenizer, prompts[i].messages), True))
    return out


def text_chunk_items(source: str, files: Sequence[Path], tokenizer: Any, plan: DataPlan,
                     train_tokens: int, heldout_tokens: int) -> list[WorkItem]:
    """Chunks of text files: a seeded sample of chunks up to the token budgets.

    A file belongs to the held-out split when its name hashes there (about 1 in
    20 files), so held-out chunks never share a file with training chunks.
    """
    chunks: dict[str, list[tuple[str, list[int]]]] = {"train": [], "heldout": []}
    for path in sorted(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        split = "heldout" if _stable_hash(path.name) % 20 == 7 else "train"
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        for j, c in enumerate(_chunks(ids, plan.chunk_len)):
            chunks[split].append((f"{path.name}/{j}", c))
    rng = random.Random(plan.seed)
    out = []
    for split, budget in (("train", train_tokens), ("heldout", heldout_tokens)):
        pool = chunks[split]
        rng.shuffle(pool)
        used = 0
        for doc_id, c in pool:
            if used >= budget:
                break
            out.append(WorkItem(source, doc_id, split, c, False))
            used += len(c)
    return out


def stdlib_files() -> list[Path]:
    """The top-level ``.py`` modules of this interpreter's standard library."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def path_items(spec: str, tokenizer: Any, plan: DataPlan) -> list[WorkItem]:
    """Items from a user path (see the module docstring); 1 in 20 rows/files held out."""
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown data source {spec!r}: not chat, humaneval, stdlib, or an existing path")
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                r = json.loads(line)
                split = "heldout" if i % 20 == 7 else "train"
                if "text" in r:
                    ids = list(tokenizer.encode(r["text"], add_special_tokens=False))
                    out += [WorkItem(spec, f"{i}/{j}", split, c, False) for j, c in enumerate(_chunks(ids, plan.chunk_len))]
                elif "messages" in r or "prompt" in r:
                    msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
                    out.append(WorkItem(spec, str(r.get("id", i)), split, _chat_ids(tokenizer, msgs), True))
                else:
                    raise ValueError(f"{path}:{i + 1}: each line needs 'text', 'messages' or 'prompt'")
        return out
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.suffix in (".py", ".md", ".txt")]
    return text_chunk_items(spec, files, tokenizer, plan, plan.stdlib_tokens, plan.heldout_stdlib_tokens)


def build_units(tokenizer: Any, plan: DataPlan) -> list[WorkUnit]:
    """The deterministic list of work units for ``plan`` (same plan, same units: resumable)."""
    items: list[WorkItem] = []
    for src in plan.sources:
        if src == "chat":
            items += chat_items(tokenizer, plan)
        elif src == "humaneval":
            items += humaneval_items(tokenizer, plan)
        elif src == "stdlib":
            items += text_chunk_items("stdlib", stdlib_files(), tokenizer, plan, plan.stdlib_tokens,
                                      plan.heldout_stdlib_tokens)
        else:
            items += path_items(src, tokenizer, plan)
    units: list[WorkUnit] = []
    gen = [it for it in items if it.generate]
    # Similar lengths share a generation batch (less left padding).
    gen.sort(key=lambda it: (it.split, len(it.token_ids)))
    for i in range(0, len(gen), plan.gen_batch_size):
        units.append(WorkUnit(f"gen-{i // plan.gen_batch_size:04d}", gen[i : i + plan.gen_batch_size], True))
    if plan.humaneval_samples > 0:
        extra = [it for it in gen if it.source == "humaneval" and it.split == "train"]
        k = 0
        for s in range(plan.humaneval_samples):
            for i in range(0, len(extra), plan.gen_batch_size):
                batch = [WorkItem(it.source, f"{it.doc_id}/sample{s}", it.split, it.token_ids, True)
                         for it in extra[i : i + plan.gen_batch_size]]
                units.append(WorkUnit(f"sample-{k:04d}", batch, True, plan.sample_temperature))
                k += 1
    tf = [it for it in items if not it.generate]
    tf.sort(key=lambda it: len(it.token_ids))
    for i in range(0, len(tf), plan.tf_batch_size):
        units.append(WorkUnit(f"tf-{i // plan.tf_batch_size:04d}", tf[i : i + plan.tf_batch_size], False))
    return units


# ---------------------------------------------------------------- the target's features
def _lse_argmax(lm_head: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, H]`` -> full-vocabulary log-sum-exp ``[T]`` and argmax ``[T]``, a block of rows at a time."""
    lse, arg = [], []
    for i in range(0, hidden.shape[0], _LOGIT_ROWS):
        logits = lm_head(hidden[i : i + _LOGIT_ROWS]).float()  # [rows, V]
        lse.append(torch.logsumexp(logits, dim=-1))
        arg.append(torch.argmax(logits, dim=-1))
    return torch.cat(lse), torch.cat(arg)


@torch.inference_mode()
def teacher_force(target: Any, items: Sequence[WorkItem]) -> list[FeatureDoc]:
    """One batched target forward over ``items`` (right-padded; causal, so padding never leaks back)."""
    model = target.model
    B, L = len(items), max(len(it.token_ids) for it in items)
    ids = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    for i, it in enumerate(items):
        ids[i, : len(it.token_ids)] = torch.tensor(it.token_ids)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, H]
    docs = []
    for i, it in enumerate(items):
        h = hidden[i, : len(it.token_ids)]  # [T, H]
        lse, arg = _lse_argmax(model.lm_head, h)
        docs.append(FeatureDoc(it.source, it.doc_id, it.split, torch.tensor(it.token_ids), h.half(), lse, arg))
    return docs


@torch.inference_mode()
def generate_with_features(target: Any, items: Sequence[WorkItem], max_new_tokens: int, temperature: float = 0.0,
                           seed: int = 0, progress: Any = None) -> list[FeatureDoc]:
    """Let the target answer a batch of prompts, keeping its features at every fed position.

    Prompts are left-padded into one batch with a KV cache; each step feeds
    every unfinished sequence's newest token. A sequence ends at EOS or after
    ``max_new_tokens``; its last token is never fed, so the document holds the
    prompt and every generated token but the last (whose choice is still
    recorded as the previous position's ``target_argmax`` when greedy).

    Args:
        target: a loaded target model.
        items: prompts (``generate=True`` items).
        max_new_tokens: most tokens generated per prompt.
        temperature: 0 greedy; > 0 samples from the tempered distribution.
        seed: sampling seed.
        progress: optional tqdm bar, advanced by generated tokens.
    """
    from transformers import DynamicCache

    model = target.model
    eos = target.eos_token_ids
    B = len(items)
    lens = [len(it.token_ids) for it in items]
    L = max(lens)
    ids = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    mask = torch.zeros((B, L), dtype=torch.long)  # [B, L], 1 = real token
    for i, it in enumerate(items):
        ids[i, L - lens[i] :] = torch.tensor(it.token_ids)
        mask[i, L - lens[i] :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    cache = DynamicCache(config=model.config)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True).last_hidden_state  # [B, L, H]
    feats: list[list[torch.Tensor]] = [[hidden[i, L - lens[i] :]] for i in range(B)]
    toks: list[list[int]] = [list(it.token_ids) for it in items]
    last = hidden[:, -1]  # [B, H]
    gen = torch.Generator().manual_seed(seed)
    active = [True] * B
    for step in range(max_new_tokens):
        logits = model.lm_head(last).float()  # [B, V]
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = torch.argmax(logits, dim=-1)  # [B]
        for i in range(B):
            if active[i] and (int(nxt[i]) in eos or step == max_new_tokens - 1):
                active[i] = False
        if progress is not None:
            progress.update(B)
        if not any(active):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
        last = model.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                           use_cache=True).last_hidden_state[:, -1]  # [B, H]
        for i in range(B):
            if active[i]:
                toks[i].append(int(nxt[i]))
                feats[i].append(last[i : i + 1])
    docs = []
    for i, it in enumerate(items):
        h = torch.cat(feats[i])  # [T, H]
        lse, arg = _lse_argmax(model.lm_head, h)
        docs.append(FeatureDoc(it.source, it.doc_id, it.split, torch.tensor(toks[i]), h.half(), lse, arg,
                               num_prompt_tokens=lens[i]))
    return docs


# ---------------------------------------------------------------- shards
def save_shard(path: Path, docs: Sequence[FeatureDoc]) -> None:
    """Write docs to ``path`` atomically (a plain dict of tensors and lists)."""
    blob = {
        "meta": [[d.source, d.doc_id, d.split, d.num_prompt_tokens] for d in docs],
        "lengths": torch.tensor([len(d) for d in docs], dtype=torch.long),
        "token_ids": torch.cat([d.token_ids for d in docs]),
        "hidden": torch.cat([d.hidden for d in docs]),
        "target_lse": torch.cat([d.target_lse for d in docs]),
        "target_argmax": torch.cat([d.target_argmax for d in docs]),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_shard(path: Path) -> list[FeatureDoc]:
    blob = torch.load(path, weights_only=True)
    docs, start = [], 0
    for (source, doc_id, split, n_prompt), n in zip(blob["meta"], blob["lengths"].tolist()):
        sl = slice(start, start + n)
        docs.append(FeatureDoc(source, doc_id, split, blob["token_ids"][sl], blob["hidden"][sl],
                               blob["target_lse"][sl], blob["target_argmax"][sl], int(n_prompt)))
        start += n
    return docs


def build_features(target: Any, plan: DataPlan, shard_dir: Path, show_progress: bool = True,
                   log: Any = print) -> tuple[list[FeatureDoc], dict]:
    """Produce (or reuse) every unit's shard; return all documents and timings.

    Returns:
        ``(docs, stats)`` with ``stats`` = seconds spent and tokens per source/split.
    """
    from tqdm import tqdm

    shard_dir.mkdir(parents=True, exist_ok=True)
    units = build_units(target.tokenizer, plan)
    todo = [u for u in units if not (shard_dir / f"{u.name}.pt").exists()]
    log(f"data: {len(units)} units ({len(units) - len(todo)} already done)")
    t0 = time.perf_counter()
    gen_units = [u for u in todo if u.generate]
    tf_units = [u for u in todo if not u.generate]
    if gen_units:
        total = sum(len(u.items) for u in gen_units) * plan.max_new_tokens
        with tqdm(total=total, desc="target answers", unit="tok", disable=not show_progress) as bar:
            for k, u in enumerate(gen_units):
                docs = generate_with_features(target, u.items, plan.max_new_tokens, u.temperature,
                                              seed=plan.seed + k, progress=bar)
                save_shard(shard_dir / f"{u.name}.pt", docs)
    t_gen = time.perf_counter() - t0
    if tf_units:
        total = sum(len(it.token_ids) for u in tf_units for it in u.items)
        with tqdm(total=total, desc="teacher forcing", unit="tok", disable=not show_progress) as bar:
            for u in tf_units:
                save_shard(shard_dir / f"{u.name}.pt", teacher_force(target, u.items))
                bar.update(sum(len(it.token_ids) for it in u.items))
    t_tf = time.perf_counter() - t0 - t_gen
    docs: list[FeatureDoc] = []
    for u in units:
        docs += load_shard(shard_dir / f"{u.name}.pt")
    tokens: dict[str, int] = {}
    for d in docs:
        key = f"{d.source}/{d.split}"
        tokens[key] = tokens.get(key, 0) + len(d)
    return docs, {"generate_s": round(t_gen, 1), "teacher_force_s": round(t_tf, 1), "tokens": tokens}


def iter_split(docs: Iterable[FeatureDoc], split: str) -> list[FeatureDoc]:
    return [d for d in docs if d.split == split]
