"""The target model: prefill, verify forward, KV-cache truncate.

Wraps a transformers causal LM (batch size 1 per request). The KV cache holds
every committed token except the newest, which the next step feeds together
with its draft tokens; rollback after a rejection is a truncate of the cache to
the committed length minus one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

DTYPES = ("float32", "int8")
RUNTIMES = ("auto", "lean", "transformers")


@dataclass
class ForwardOutput:
    """Target outputs for the fed tokens.

    Attributes:
        logits: ``[T, V]`` float32; row i is the distribution over the token that
            follows fed token i (only the last row when ``last_only``).
        hidden: ``[T, H]`` float32 last-layer hidden states after the final norm
            (what the LM head reads), rows aligned with ``logits``.
    """

    logits: torch.Tensor
    hidden: torch.Tensor


@dataclass
class KVCache:
    """One request's KV cache; ``length`` is how many positions it holds."""

    cache: Any
    length: int = 0


@dataclass
class TargetModel:
    """A loaded target model.

    Attributes:
        model: the transformers ``*ForCausalLM`` module (eval mode).
        tokenizer: its tokenizer.
        name: the model id used everywhere (CLI, API).
        dtype: "float32" or "int8".
        max_model_len: context window in tokens.
        quant_report: what the int8 path quantized (empty for float32).
    """

    model: Any
    tokenizer: Any
    name: str
    dtype: str = "float32"
    max_model_len: int = 2048
    quant_report: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (may exceed ``len(tokenizer)`` when padded)."""
        return int(self.model.config.vocab_size)

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.config.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None),
                    self.tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update([src] if isinstance(src, int) else list(src))
        return ids

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.tokenizer.bos_token_id

    def new_cache(self) -> KVCache:
        from transformers import DynamicCache

        return KVCache(cache=DynamicCache(config=self.model.config), length=0)

    @torch.inference_mode()
    def forward(self, kv: KVCache, token_ids: Sequence[int], last_only: bool = False) -> ForwardOutput:
        """Feed ``token_ids`` after the cached positions and return their outputs.

        Args:
            kv: the request's cache; grows by ``len(token_ids)``.
            token_ids: T >= 1 token ids at positions ``kv.length .. kv.length + T - 1``.
            last_only: compute logits for the last position only (prefill).

        Returns:
            ForwardOutput with ``[T, V]`` (or ``[1, V]``) logits and hidden states.

        Raises:
            ValueError: if ``token_ids`` is empty or runs past ``max_model_len``.
        """
        T = len(token_ids)
        if T == 0:
            raise ValueError("forward needs at least one token")
        if kv.length + T > self.max_model_len:
            raise ValueError(f"positions up to {kv.length + T} exceed the context window {self.max_model_len}")
        ids = torch.tensor([list(token_ids)], dtype=torch.long)  # [1, T]
        out = self.model.model(input_ids=ids, cache=kv.cache, use_cache=True)
        hidden = out.last_hidden_state[0]  # [T, H]
        if last_only:
            hidden = hidden[-1:]
        logits = self.model.lm_head(hidden).float()  # [T, V]
        kv.length += T
        return ForwardOutput(logits=logits, hidden=hidden.float())

    #: whether :meth:`forward_tree` exists (token trees need a tree attention mask;
    #: this runtime has none, so the engine verifies chains here).
    supports_trees = False

    def forward_tree(self, kv: KVCache, token_ids: Sequence[int], parents: Sequence[int]) -> ForwardOutput:
        """A token tree's forward (the lean runtime only: see :class:`adaspec.model.target.LeanTarget`).

        Raises:
            NotImplementedError: always, on this runtime.
        """
        raise NotImplementedError(f"the {getattr(self, 'runtime', 'transformers')} runtime has no tree attention; "
                                  "token trees need the lean core (--runtime lean)")

    def truncate(self, kv: KVCache, length: int) -> None:
        """Roll the cache back to its first ``length`` positions."""
        if length < 0 or length > kv.length:
            raise ValueError(f"cannot truncate a cache of length {kv.length} to {length}")
        if length < kv.length:
            # transformers 5.x: crop(-tokens_to_remove); 4.x: crop(max_length).
            kv.cache.crop(length - kv.length) if _crop_takes_count() else kv.cache.crop(length)
            kv.length = length


_CROP_TAKES_COUNT: Optional[bool] = None


def _crop_takes_count() -> bool:
    global _CROP_TAKES_COUNT
    if _CROP_TAKES_COUNT is None:
        import inspect

        from transformers import DynamicCache

        _CROP_TAKES_COUNT = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters
    return _CROP_TAKES_COUNT


def load_target(
    name: str,
    dtype: str = "float32",
    max_model_len: Optional[int] = None,
    num_threads: Optional[int] = None,
    runtime: str = "auto",
) -> TargetModel:
    """Load a target model by registry name or local path.

    Args:
        name: registry name (``adaspec models``), local HF folder or GGUF file.
        dtype: "float32" or "int8" (batch-invariant int8, see :mod:`adaspec.quant`).
        max_model_len: context window; defaults to the config's
            ``max_position_embeddings`` capped at 8192.
        num_threads: torch intra-op threads (default: leave as is).
        runtime: "auto" (default: the lean core, :mod:`adaspec.model`, where the
            architecture is supported and its kernel builds, else transformers with
            a one-line note on stderr saying why), "lean" (or raise), "transformers".
            ``$ADASPEC_RUNTIME`` overrides "auto".

    An int8 model on the lean core whose int8 model cache exists (every load after
    the first) is built from that file without transformers
    (:func:`adaspec.model.fast_load.load_fast`; bitwise the same target).

    Returns:
        a :class:`TargetModel` (a :class:`adaspec.model.target.LeanTarget` on the lean core).

    Raises:
        ValueError: unknown model, dtype or runtime; "lean" on an unsupported architecture.
        RuntimeError: "lean" and the kernel does not build.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if runtime == "auto":
        import os

        runtime = os.environ.get("ADASPEC_RUNTIME", "auto") or "auto"
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    from adaspec.models import resolve_model

    if num_threads:
        torch.set_num_threads(num_threads)
    path = resolve_model(name)
    if dtype == "int8" and runtime in ("auto", "lean"):
        from adaspec.model.fast_load import load_fast

        try:
            fast = load_fast(name, path, max_model_len=max_model_len)
        except RuntimeError:  # no kernel: "auto" falls back below with its note, "lean" raises there
            fast = None
        if fast is not None:
            return fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    window = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    window = min(window, 8192) if max_model_len is None else int(max_model_len)
    target = TargetModel(model=model, tokenizer=tokenizer, name=name, dtype=dtype, max_model_len=window)
    if dtype == "int8":
        from adaspec.quant import quantize_target

        target.quant_report = quantize_target(target)
    return on_runtime(target, runtime)


def on_runtime(target: TargetModel, runtime: str) -> TargetModel:
    """A loaded (for int8, quantized) transformers target on ``runtime``: itself for
    "transformers", else the lean core; "auto" falls back to ``target`` with a one-line
    note on stderr where the lean core cannot run it.

    Raises:
        ValueError / RuntimeError: "lean" on an unsupported architecture or without the kernel.
    """
    if runtime == "transformers":
        return target
    from adaspec.model.target import lean_target

    try:
        return lean_target(target)
    except (ValueError, RuntimeError) as exc:
        if runtime == "lean":
            raise
        import sys

        print(f"adaspec: lean runtime unavailable for {target.name} ({exc}); using transformers", file=sys.stderr)
        return target
