"""Batch-invariant causal attention (``"adaspec_invariant"`` in transformers' ``AttentionInterface``).

For forwards of T <= :data:`MAX_INVARIANT_TOKENS` new tokens every output row
is computed by the same fixed sequence of float operations whatever T is: a
small C++ kernel (``invariant_attention.cpp`` beside this file) built on first
use (:func:`attention_kernel`), or, where it cannot be built, one
``scaled_dot_product_attention`` call per query (the call plain decoding makes).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

INVARIANT_ATTENTION = "adaspec_invariant"
# Forwards with at most this many new tokens take the invariant attention path;
# longer ones (prompt prefill) one batched causal SDPA call.
MAX_INVARIANT_TOKENS = 64

# The kernel's source, built once per machine and source version with
# torch.utils.cpp_extension.load_inline (needs g++ and ninja). Every output row is
# computed by the same fixed sequence of float operations whatever the number of
# queries in the call, and K/V are read once for all queries.
KERNEL_SOURCE = Path(__file__).resolve().with_name("invariant_attention.cpp")


_KERNEL_STATE: dict = {}  # "op": the loaded function or None, "error": why it is None


def attention_kernel() -> Optional[object]:
    """The compiled invariant-attention function, or None (then a Python loop is used).

    Controlled by ``$ADASPEC_ATTENTION_KERNEL``: ``auto`` (default: build, fall
    back to the loop on failure), ``cpp`` (build or raise), ``loop`` (never
    build). The build (~30 s, once per machine and source version) goes to
    ``<adaspec cache>/torch_extensions/``; it needs AVX2, g++ and ninja.

    Returns:
        a callable ``(q [T, H, D], k [Hkv, S, D], v [Hkv, S, D], scaling) -> [T, H, D]``
        (float32; query t at position S - T + t), or None.

    Raises:
        RuntimeError: ``$ADASPEC_ATTENTION_KERNEL=cpp`` and the build failed.
    """
    mode = os.environ.get("ADASPEC_ATTENTION_KERNEL", "auto")
    if mode not in ("auto", "cpp", "loop"):
        raise ValueError(f"ADASPEC_ATTENTION_KERNEL must be auto, cpp or loop, got {mode!r}")
    if mode == "loop":
        return None
    if "op" not in _KERNEL_STATE:
        op, error = None, None
        try:
            if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
                raise RuntimeError(f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2")
            from torch.utils.cpp_extension import load_inline

            from adaspec.cpp_ext import build_and_load, extension_dir

            source = KERNEL_SOURCE.read_text(encoding="utf-8")
            digest = hashlib.sha256(source.encode()).hexdigest()[:12]
            name = f"adaspec_invariant_attention_{digest}"
            module = build_and_load(
                name, extension_dir(name),
                lambda build_dir: load_inline(name=name, cpp_sources=[source], functions=["invariant_attention"],
                                              extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=fast"],
                                              build_directory=build_dir, verbose=False),
                what="invariant-attention C++ kernel")
            op = module.invariant_attention
        except Exception as exc:  # no compiler, no ninja, no AVX2, ...
            error = f"{type(exc).__name__}: {exc}"
        _KERNEL_STATE.update(op=op, error=error)
    if _KERNEL_STATE["op"] is None and mode == "cpp":
        raise RuntimeError(f"invariant attention kernel unavailable: {_KERNEL_STATE['error']}")
    return _KERNEL_STATE["op"]


def _kernel_fits(query: torch.Tensor, key: torch.Tensor) -> bool:
    D = query.shape[-1]
    return (query.dtype == key.dtype == torch.float32 and D % 8 == 0 and D <= 256
            and query.shape[1] % key.shape[1] == 0)


def invariant_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention whose per-query result does not depend on the forward's length.

    A transformers ``AttentionInterface`` function. For T <= ``MAX_INVARIANT_TOKENS``
    new tokens, query i (absolute position ``S - T + i``) attends to keys
    ``[0, S - T + i]`` by a computation that is the same whatever T is:

    - with the compiled kernel (:func:`attention_kernel`, pinned on the module by
      :func:`use_invariant_attention`): a fixed operation order per output row,
      K/V read once for all queries;
    - otherwise: one ``scaled_dot_product_attention`` call per query over its
      visible keys (its GQA group packed as rows, as transformers does for
      decoding) -- the very call plain decoding makes for that position.

    Longer forwards (prompt prefill) use one causal SDPA call; they are not part
    of the invariance contract. Batch size must be 1 with no padding (the
    ``attention_mask`` is not read: causality comes from the positions); a batch
    > 1 falls back to transformers' SDPA (not invariant).

    Args:
        module: the attention module (reads ``num_key_value_groups``).
        query: ``[B, H, T, D]`` float.
        key, value: ``[B, Hkv, S, D]`` float, S = cached + T.
        attention_mask: ignored for B == 1 (see above).
        dropout: must be 0 (inference only).
        scaling: softmax scale (default ``D ** -0.5``).

    Returns:
        ``([B, T, H, D] attention output, None)``.
    """
    B, H, T, D = query.shape
    S = key.shape[2]
    if B != 1 or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = D ** -0.5 if scaling is None else scaling
    Hkv = key.shape[1]
    n_rep = H // Hkv
    if T > MAX_INVARIANT_TOKENS:
        # prefill: one causal call; keys before the first query are all visible
        mask = None if S == T else torch.ones(T, S, dtype=torch.bool).tril_(S - T)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                             scale=scaling, enable_gqa=n_rep > 1)  # [1, H, T, D]
        return out.transpose(1, 2).contiguous(), None
    pinned = getattr(module, "_adaspec_attention_kernel", None)
    kernel = pinned[0] if pinned is not None else attention_kernel()
    kernel = kernel if _kernel_fits(query, key) else None
    if kernel is not None:
        # query [1, H, T, D] -> [T, H, D] (a view of the projection output)
        return kernel(query[0].transpose(0, 1), key[0], value[0], float(scaling))[None], None
    outs = []
    for i in range(T):
        visible = S - T + i + 1
        q = query[:, :, i, :].reshape(1, Hkv, n_rep, D)  # this query's GQA group as rows
        o = F.scaled_dot_product_attention(q, key[:, :, :visible], value[:, :, :visible], scale=scaling)
        outs.append(o.reshape(1, 1, H, D))
    return (outs[0] if T == 1 else torch.cat(outs, dim=1)), None  # [1, T, H, D]


def use_invariant_attention(model: nn.Module) -> str:
    """Register :func:`invariant_attention_forward` and switch ``model`` to it (in place).

    The implementation (compiled kernel or SDPA per query, see
    :func:`attention_kernel`) is chosen here, once, and pinned on every
    attention module, so one model never mixes the two (their roundings differ).

    Returns:
        "cpp" or "sdpa per query".

    Raises:
        RuntimeError: the model does not dispatch attention through
            transformers' ``AttentionInterface``.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(INVARIANT_ATTENTION, invariant_attention_forward)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise RuntimeError("use_invariant_attention needs a transformers PreTrainedModel")
    kernel = attention_kernel()
    # Setting the config field directly: the attention modules share this config
    # object and read the field on every call; set_attn_implementation() would
    # validate against the hub-kernel list first.
    config._attn_implementation = INVARIANT_ATTENTION
    for sub in model.modules():
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and hasattr(sub_config, "_attn_implementation"):
            sub_config._attn_implementation = INVARIANT_ATTENTION
        if hasattr(sub, "num_key_value_groups"):  # an attention module
            sub._adaspec_attention_kernel = (kernel,)  # tuple: not a submodule/parameter
    return "cpp" if kernel is not None else "sdpa per query"

