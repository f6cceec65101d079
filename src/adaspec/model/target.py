"""LeanTarget: :class:`adaspec.target.TargetModel`'s interface on the lean decoder.

The runtime forward goes through :class:`adaspec.model.decoder.LeanDecoder`
(one C++ call per forward); ``model`` still points at the transformers module
(same weights, quantized in place for int8) for the code that reads its
embedding, LM head and final norm (draft head) or runs it whole (perplexity,
training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from adaspec.model.decoder import BatchRequest, LeanDecoder
from adaspec.model.kv import LeanKVCache
from adaspec.target import ForwardOutput, TargetModel


@dataclass
class LeanTarget(TargetModel):
    """A target model whose forwards run on the lean core.

    Attributes (besides :class:`~adaspec.target.TargetModel`'s):
        decoder: the :class:`~adaspec.model.decoder.LeanDecoder`.
        runtime: "lean".
        fast_tensors: set by :func:`adaspec.model.fast_load.load_fast` (``model`` is then a
            :class:`~adaspec.model.fast_load.LazyModule`): the vocabulary size, EOS ids,
            embedding, LM head and final norm, read from the int8 cache without loading
            ``model``. Used only while ``model`` is that stand-in (a weight update
            replaces it, and then the new module answers).
    """

    decoder: Optional[LeanDecoder] = None
    runtime: str = "lean"
    fast_tensors: Optional[Any] = None

    def current_fast_tensors(self) -> Optional[Any]:
        """:attr:`fast_tensors` while they describe the served weights, else None."""
        if self.fast_tensors is None:
            return None
        from adaspec.model.fast_load import LazyModule

        return self.fast_tensors if isinstance(self.model, LazyModule) else None

    @property
    def vocab_size(self) -> int:
        fast = self.current_fast_tensors()
        return fast.vocab_size if fast is not None else super().vocab_size

    @property
    def eos_token_ids(self) -> set[int]:
        fast = self.current_fast_tensors()
        return set(fast.eos_token_ids) if fast is not None else super().eos_token_ids

    def new_cache(self) -> LeanKVCache:
        return self.decoder.new_cache()

    def forward(self, kv: LeanKVCache, token_ids: Sequence[int], last_only: bool = False) -> ForwardOutput:
        """As :meth:`adaspec.target.TargetModel.forward` (batch invariant, bitwise)."""
        if len(token_ids) == 0:
            raise ValueError("forward needs at least one token")
        if kv.length + len(token_ids) > self.max_model_len:
            raise ValueError(f"positions up to {kv.length + len(token_ids)} exceed the context window {self.max_model_len}")
        logits, hidden = self.decoder.forward(kv, token_ids, last_only=last_only)
        return ForwardOutput(logits=logits, hidden=hidden)

    def forward_batch(self, requests: Sequence[BatchRequest]) -> list[ForwardOutput]:
        """Several requests' fed tokens in one forward (see :meth:`LeanDecoder.forward_batch`)."""
        for r in requests:
            if r.cache.length + len(r.token_ids) > self.max_model_len:
                raise ValueError(f"positions up to {r.cache.length + len(r.token_ids)} exceed the context window "
                                 f"{self.max_model_len}")
        return [ForwardOutput(logits=lg, hidden=h) for lg, h in self.decoder.forward_batch(requests)]

    supports_trees = True

    def forward_tree(self, kv: LeanKVCache, token_ids: Sequence[int], parents: Sequence[int]) -> ForwardOutput:
        """Feed a token tree: fed token i sees the cache and its ancestors only (tree attention mask).

        Args:
            kv: the request's cache; grows by ``len(token_ids)`` (keep the
                accepted path with :meth:`keep_path`).
            token_ids: T >= 1 fed tokens, parents before children.
            parents: ``parents[i]``: fed index of token i's parent, -1 for the last cached token.

        Returns:
            ForwardOutput with ``[T, V]`` float32 logits and ``[T, H]`` hidden states.

        Raises:
            ValueError: an empty or malformed tree, or positions past the context window.
        """
        if len(token_ids) == 0:
            raise ValueError("forward needs at least one token")
        return self.forward_batch([BatchRequest(kv, token_ids, parents=parents)])[0]

    def keep_path(self, kv: LeanKVCache, start: int, fed_indices: Sequence[int]) -> None:
        """After :meth:`forward_tree` fed at slot ``start``: keep fed tokens ``fed_indices``
        (a root-to-leaf path) at slots ``start, start + 1, ...`` and drop the rest."""
        self.decoder.keep_path(kv, start, fed_indices)

    def truncate(self, kv: LeanKVCache, length: int) -> None:
        """Roll the cache back to its first ``length`` positions (a length change)."""
        kv.truncate(length)


def lean_target(target: TargetModel, pool_tokens: Optional[int] = None) -> LeanTarget:
    """Wrap a loaded (and, for int8, quantized) :class:`TargetModel` in the lean runtime.

    Raises:
        ValueError: the architecture is not supported (:func:`adaspec.model.decoder.unsupported_reason`).
        RuntimeError: the kernel does not build.
    """
    decoder = LeanDecoder.from_hf(target.model, target.max_model_len, pool_tokens=pool_tokens)
    return LeanTarget(model=target.model, tokenizer=target.tokenizer, name=target.name, dtype=target.dtype,
                      max_model_len=target.max_model_len, quant_report=target.quant_report, decoder=decoder)
