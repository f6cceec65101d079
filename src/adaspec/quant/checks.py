"""Checks of the int8 path against fp32 and against itself: perplexity, batch invariance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _scored_sequences(tokenizer_or_ids, texts: Optional[Sequence[str]], max_tokens: int) -> list[torch.Tensor]:
    """``[T]`` int64 sequences cut to ``max_tokens``, those with at least 2 tokens (something to predict)."""
    if isinstance(tokenizer_or_ids, (list, tuple)):
        seqs = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in tokenizer_or_ids]
    else:
        if texts is None:
            raise ValueError("perplexity with a tokenizer needs texts")
        seqs = [torch.as_tensor(tokenizer_or_ids(t)["input_ids"], dtype=torch.long) for t in texts]
    seqs = [ids[:max_tokens] for ids in seqs]
    return [ids for ids in seqs if len(ids) >= 2]


def _summary(total_nll: float, count: int) -> dict:
    if count == 0:
        raise ValueError("no sequence with at least 2 tokens")
    return {"ppl": math.exp(total_nll / count), "nll": total_nll / count, "tokens": count}


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer_or_ids, texts: Optional[Sequence[str]] = None,
               max_tokens: int = 512) -> dict:
    """Token-level perplexity of a transformers module on held-out text.

    One forward per sequence (no cache), mean negative log-likelihood over all
    predicted tokens of all sequences, ``exp`` of it. :func:`runtime_perplexity`
    does the same through a target's runtime forward (lean or transformers).

    Args:
        model: a transformers causal LM.
        tokenizer_or_ids: a tokenizer (then ``texts`` is required; each text is
            tokenized with special tokens) or a list of ``[T]`` int64 tensors.
        texts: the texts when a tokenizer is given.
        max_tokens: each sequence is cut to this many tokens.

    Returns:
        ``{"ppl": float, "nll": float (nats per token), "tokens": int}``.

    Raises:
        ValueError: a tokenizer without texts, or nothing to score.
    """
    total, count = 0.0, 0
    for ids in _scored_sequences(tokenizer_or_ids, texts, max_tokens):
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()  # [T-1, V]
        total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        count += len(ids) - 1
    return _summary(total, count)


@torch.inference_mode()
def runtime_perplexity(target, tokenizer_or_ids, texts: Optional[Sequence[str]] = None,
                       max_tokens: int = 512, chunk: int = 64) -> dict:
    """Perplexity as :func:`perplexity`, computed through ``target.forward`` (the runtime that decodes).

    Each sequence is prefilled into a fresh cache in forwards of ``chunk``
    tokens, keeping every fed position's logits (``last_only=False``), so the
    score covers the forward the engine runs: the lean core for a
    :class:`~adaspec.model.target.LeanTarget`, transformers with a cache for a
    plain :class:`~adaspec.target.TargetModel`. On a batch-invariant runtime
    the result does not depend on ``chunk``.

    Args:
        target: anything with ``new_cache()`` and ``forward(cache, token_ids, last_only)``
            returning ``.logits`` ``[T, V]``.
        tokenizer_or_ids, texts, max_tokens: as :func:`perplexity`.
        chunk: tokens per prefill forward (>= 1).

    Returns:
        ``{"ppl", "nll", "tokens"}`` as :func:`perplexity`.

    Raises:
        ValueError: ``chunk < 1``, a tokenizer without texts, or nothing to score.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    total, count = 0.0, 0
    for ids in _scored_sequences(tokenizer_or_ids, texts, max_tokens):
        kv = target.new_cache()
        feed = ids[:-1].tolist()  # the last token is only predicted
        rows = []
        for start in range(0, len(feed), chunk):
            rows.append(target.forward(kv, feed[start:start + chunk], last_only=False).logits.float())
        logits = torch.cat(rows)  # [T-1, V]
        total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        count += len(ids) - 1
    return _summary(total, count)


@dataclass
class InvarianceResult:
    """Logits of T-token forwards against 1-token forwards, for one chunk size.

    Attributes:
        chunk: tokens per forward (T) in the batched run.
        positions: positions compared.
        equal: positions whose logits are bitwise equal (``torch.equal``).
        max_abs_diff: largest |difference| over all logits.
        argmax_mismatches: positions whose argmax differs.
    """

    chunk: int
    positions: int
    equal: int
    max_abs_diff: float
    argmax_mismatches: int

    @property
    def invariant(self) -> bool:
        return self.equal == self.positions


@torch.inference_mode()
def _chunked_logits(model: nn.Module, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=prompt_ids.reshape(1, -1), cache=cache, use_cache=True)
    outs = []
    for start in range(0, len(continuation_ids), chunk):
        ids = continuation_ids[start:start + chunk].reshape(1, -1)
        outs.append(model(input_ids=ids, cache=cache, use_cache=True).logits[0].float())
    return torch.cat(outs)  # [len(continuation_ids), V]


def check_batch_invariance(model: nn.Module, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor,
                           chunks: Iterable[int] = range(2, 18)) -> list[InvarianceResult]:
    """Compare logits position by position: 1 token per forward vs ``chunk`` per forward.

    Prefills ``prompt_ids`` once per run, then feeds ``continuation_ids`` in
    forwards of ``chunk`` tokens (the last one shorter), with a ``DynamicCache``;
    the reference run feeds them one at a time (plain decoding).

    Args:
        model: a transformers causal LM.
        prompt_ids: ``[P]`` int64.
        continuation_ids: ``[C]`` int64; positions compared = C.
        chunks: the T values to test.

    Returns:
        one :class:`InvarianceResult` per chunk size.
    """
    prompt_ids = torch.as_tensor(prompt_ids).reshape(-1)
    continuation_ids = torch.as_tensor(continuation_ids).reshape(-1)
    ref = _chunked_logits(model, prompt_ids, continuation_ids, 1)
    results = []
    for chunk in chunks:
        got = _chunked_logits(model, prompt_ids, continuation_ids, chunk)
        equal = sum(torch.equal(ref[j], got[j]) for j in range(len(ref)))
        results.append(InvarianceResult(
            chunk=chunk, positions=len(ref), equal=int(equal),
            max_abs_diff=float((ref - got).abs().max()),
            argmax_mismatches=int((ref.argmax(-1) != got.argmax(-1)).sum())))
    return results
