"""Draft model: a separate, smaller causal LM with the target's tokenizer drafts the tokens.

Classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023), e.g.
Qwen2.5-Coder-0.5B drafting for Qwen2.5-Coder-1.5B. The draft model keeps its
own KV cache per request; before each draft the cache is synced with the
committed tokens (truncated at the first difference, then fed what is new),
and k tokens are drafted one forward each.

Guarantees at the vocabulary boundary:

- a draft model whose tokenizer differs from the target's is refused at load
  (:func:`check_same_tokenizer`), since its token ids would mean other text;
- a vocabulary padded to a larger size (extra LM-head rows beyond the
  tokenizer, common for GPU-friendly shapes) is handled: logits of ids outside
  the shared vocabulary are masked, so no draft id >= the target's vocabulary
  size ever reaches verification, and ``draft_probs`` have the target's width;
- a draft model with a shorter context window than the target stops drafting
  once the next position would fall outside its window (an empty draft: the
  engine then decodes plainly).

Unlike the speculators that must run inside other engines, this one holds a
model, so it may use transformers; it imports it lazily, only to load a model
and to make caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from adaspec.speculators.base import Speculator, draft_probs_matrix, draft_sampler, draft_token
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext, common_prefix_len


@dataclass
class _RequestCache:
    """The draft model's cache for one request; ``fed`` are the token ids it holds, in order."""

    cache: Any
    fed: list[int] = field(default_factory=list)
    generator: Optional[torch.Generator] = None  # unused by seeded requests (they draft coupled)


def check_same_tokenizer(target_tokenizer: Any, draft_tokenizer: Any, draft_name: str = "draft model") -> None:
    """Refuse a draft tokenizer that maps any token differently from the target's.

    Raises:
        ValueError: the vocabularies (token -> id, added tokens included) differ;
            the message names a few differing tokens.
    """
    tv, dv = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if tv == dv:
        return
    only_t = [t for t in tv if t not in dv]
    only_d = [t for t in dv if t not in tv]
    moved = [t for t in tv if t in dv and tv[t] != dv[t]]
    examples = (only_t + only_d + moved)[:5]
    raise ValueError(
        f"{draft_name} uses a different tokenizer from the target ({len(tv)} vs {len(dv)} tokens; "
        f"{len(only_t)} only in the target, {len(only_d)} only in the draft, {len(moved)} with other ids; "
        f"e.g. {examples!r}); a draft model must share the target's tokenizer"
    )


def _crop(cache: Any, length: int) -> None:
    """Truncate a transformers cache to its first ``length`` positions.

    transformers 5.x takes ``crop(-tokens_to_remove)``; 4.x takes ``crop(max_length)``.
    """
    import inspect

    current = cache.get_seq_length()
    if length >= current:
        return
    if "tokens_to_remove" in inspect.signature(cache.crop).parameters:
        cache.crop(length - current)
    else:
        cache.crop(length)


class DraftModelSpeculator(Speculator):
    """Drafts with a smaller causal LM that shares the target's tokenizer.

    Greedy requests get the draft model's argmax chain (no ``draft_probs``);
    sampled requests get tokens sampled from its distribution processed with
    the request's temperature / top-k / top-p, reported as ``draft_probs``.
    ``confidence[i]`` is the draft model's probability of draft token i.

    Args:
        model: a causal LM called as ``model(input_ids=[1, T], cache=..., use_cache=True,
            logits_to_keep=1)`` returning ``.logits`` of shape ``[1, 1, V_draft]``.
        new_cache: makes an empty cache for ``model``.
        target_vocab_size: the target's vocabulary size V (rows of its LM head).
        num_valid_tokens: ids ``0..num_valid_tokens-1`` may be drafted (the
            tokenizer's size, at most V and V_draft); the rest are masked.
        max_model_len: the draft model's context window; drafting stops before
            a position would reach it.
        seed: seed of the draft sampler shared by unseeded requests (each
            draft a fresh draw from its ``draft_probs``, which rejection
            sampling needs to be exact); a seeded request drafts with the
            coupled verifier's noise at each output position
            (:func:`~adaspec.speculators.base.coupled_draft`). Default 0.
        model_name: for messages.

    Raises:
        ValueError: ``num_valid_tokens`` outside ``1..target_vocab_size``.
    """

    name = "draft_model"
    needs_hidden_states = False
    provides_draft_probs = True

    def __init__(self, model: Any, new_cache: Callable[[], Any], target_vocab_size: int, num_valid_tokens: int,
                 max_model_len: int, seed: int = 0, model_name: str = "") -> None:
        if not 0 < num_valid_tokens <= target_vocab_size:
            raise ValueError(f"num_valid_tokens must be in 1..{target_vocab_size}, got {num_valid_tokens}")
        self.model = model
        self.new_cache = new_cache
        self.target_vocab_size = target_vocab_size
        self.num_valid_tokens = num_valid_tokens
        self.max_model_len = max_model_len
        self.seed = seed
        self.model_name = model_name
        self._requests: dict[str, _RequestCache] = {}
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_pretrained(cls, path_or_name: str, target: Any, max_model_len: Optional[int] = None,
                        seed: int = 0) -> "DraftModelSpeculator":
        """Load a draft model for ``target`` (registry name, HF folder or GGUF file).

        Args:
            path_or_name: the draft model (see ``adaspec models``).
            target: the loaded target model (``adaspec.target.TargetModel``).
            max_model_len: the draft's context window; default its config's
                ``max_position_embeddings``.

        Raises:
            ValueError: the draft's tokenizer differs from the target's, or its
                LM head has fewer rows than its tokenizer has tokens.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

        from adaspec.models import resolve_model

        path = resolve_model(path_or_name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        check_same_tokenizer(target.tokenizer, tokenizer, f"draft model {path_or_name}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        draft_vocab = int(model.config.vocab_size)
        if draft_vocab < len(tokenizer):
            raise ValueError(f"draft model {path_or_name} has {draft_vocab} LM-head rows for {len(tokenizer)} tokens")
        window = max_model_len or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        valid = min(len(tokenizer), draft_vocab, int(target.vocab_size))
        return cls(model, lambda: DynamicCache(config=model.config), int(target.vocab_size), valid, window,
                   seed=seed, model_name=str(path_or_name))

    # ---------------------------------------------------------------- lifecycle
    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        self._requests[request_id] = _RequestCache(self.new_cache())

    def stop_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def max_drafts_at(self, context_len: int) -> int:
        """Most draft tokens the window allows after ``context_len`` committed tokens.

        Draft i (1-based) needs the draft model to read position
        ``context_len + i - 2`` (0-based), which must be ``< max_model_len``.
        """
        return max(0, self.max_model_len - context_len + 1)

    # ---------------------------------------------------------------- drafting
    def _forward(self, req: _RequestCache, ids: Sequence[int]) -> torch.Tensor:
        """Feed ``ids`` after the cached tokens; ``[V_draft]`` logits of the last one."""
        x = torch.tensor([list(ids)], dtype=torch.long)  # [1, T]
        out = self.model(input_ids=x, cache=req.cache, use_cache=True, logits_to_keep=1)
        req.fed.extend(int(t) for t in ids)
        return out.logits[0, -1].float()

    def _sync(self, req: _RequestCache, tokens: Sequence[int]) -> list[int]:
        """Truncate the cache to the longest prefix it shares with ``tokens``; return what to feed.

        At least the newest token is always fed (its logits draft the first token).
        """
        fed = req.fed
        n = min(len(fed), len(tokens) - 1)
        if fed[:n] != list(tokens[:n]):  # one C-level comparison in the common case
            n = common_prefix_len(fed, tokens[:n])
        if n < len(fed):
            _crop(req.cache, n)
            del fed[n:]
        return list(tokens[n:])

    @torch.inference_mode()
    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        """Draft up to ``max_draft_tokens`` tokens (fewer near the draft model's window)."""
        tokens = ctx.token_ids
        k = min(max_draft_tokens, self.max_drafts_at(len(tokens)))
        if k <= 0 or not tokens:
            return DraftProposal(speculator=self.name)
        req = self._requests.get(ctx.request_id)
        if req is None:  # a caller that skipped start_request
            req = self._requests[ctx.request_id] = _RequestCache(self.new_cache())
        n_valid = self.num_valid_tokens
        sampler = None if ctx.greedy else draft_sampler(req, ctx, self._generator)
        feed = self._sync(req, tokens)
        ids: list[int] = []
        conf: list[float] = []
        rows: list[torch.Tensor] = []  # [n_valid] each, sampled requests only
        for i in range(k):
            logits = self._forward(req, feed)[:n_valid]  # padded rows (>= n_valid) never drafted
            tok, c, row = draft_token(logits, ctx, sampler, step=i, vocab_size=self.target_vocab_size)
            if row is not None:
                rows.append(row)
            ids.append(tok)
            conf.append(c)
            feed = [tok]
        draft_probs = draft_probs_matrix(rows, self.target_vocab_size, slice(0, n_valid))
        return DraftProposal(token_ids=ids, draft_probs=draft_probs, confidence=conf, speculator=self.name)
