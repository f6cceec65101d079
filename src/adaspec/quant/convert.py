"""Turn a transformers model into the int8 path: replace its linears, switch its attention."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import nn

from adaspec.quant.attention import _KERNEL_STATE, INVARIANT_ATTENTION, use_invariant_attention
from adaspec.quant.calibration import (
    ActivationStats,
    cached_activation_stats,
    collect_activation_stats,
    default_calibration_ids,
    smooth_factors,
    smooth_model,
    summarise_stats,
)
from adaspec.quant.linear import FusedInt8Group, FusedInt8Member, Int8Linear, default_bits, quantized_engine

DEFAULT_SMOOTH_ALPHA = 0.5  # SmoothQuant migration strength of the default int8 path

# Projections that read the same input tensor, fused into one matmul when all present.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _decoder_linears(model: nn.Module, lm_head: bool) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """``(full name, parent, attribute, linear)`` for each linear to quantize."""
    out = []
    for name, mod in model.named_modules():
        for attr, child in mod.named_children():
            full = f"{name}.{attr}" if name else attr
            if not isinstance(child, nn.Linear):
                continue
            if ".layers." in f".{full}" or (lm_head and attr == "lm_head" and mod is model):
                out.append((full, mod, attr, child))
    return out


def quantize_model_int8(model: nn.Module, calibration_ids: Optional[Sequence[torch.Tensor]] = None, *,
                        lm_head: bool = True, smooth_alpha: Optional[float] = DEFAULT_SMOOTH_ALPHA,
                        activation_bits: Optional[int] = None, weight_bits: Optional[int] = None,
                        fuse: bool = True, invariant_attention: bool = True,
                        stats: Optional[dict[str, "ActivationStats"]] = None) -> dict:
    """Make ``model`` the fast batch-invariant int8 path, in place.

    Replaces every ``nn.Linear`` under ``*.layers.*`` (attention and MLP
    projections) and, with ``lm_head``, the LM head by :class:`Int8Linear`
    (q/k/v and gate/up fused into one :class:`FusedInt8Group` each, bitwise
    equal to unfused), and switches attention to
    :func:`invariant_attention_forward`. A tied LM head is untied: it gets its
    own int8 copy, the input embedding stays fp32. Activation scales are per
    token (no calibration needed for invariance); the calibration sequences
    feed :func:`smooth_model` (SmoothQuant) and the report.

    Args:
        model: a transformers decoder-only causal LM in fp32 (llama, qwen2, ...).
        calibration_ids: ``[T]`` int64 tensors (e.g. :func:`default_calibration_ids`),
            run through the fp32 model once; None skips smoothing and statistics.
        lm_head: also quantize the LM head (49152 x 576 for SmolLM2: the largest
            matmul at k = 1).
        smooth_alpha: SmoothQuant migration strength (None or 0: no smoothing).
        activation_bits, weight_bits: default :func:`default_bits`.
        fuse: fuse the projections of :data:`FUSED_GROUPS` that share an input.
        invariant_attention: switch attention to the invariant implementation
            (without it the model is *not* batch-invariant).
        stats: precomputed :func:`collect_activation_stats` of this fp32 model on
            ``calibration_ids`` (e.g. from :func:`cached_activation_stats`);
            skips the calibration forwards.

    Returns:
        A report: ``quantized`` (module names), ``fused`` (groups), ``smoothed``
        (module names), ``activation_bits``, ``weight_bits``, ``attention``,
        ``lm_head`` ("int8, untied from the embedding", "int8" or "fp32"),
        ``weight_bytes_fp32`` / ``weight_bytes_int8`` of the replaced layers,
        ``calibration`` (sequences, tokens, seconds, per-layer-kind worst case
        of :class:`ActivationStats`; only with calibration_ids).

    Raises:
        RuntimeError: no fbgemm engine on this CPU, or a layer is not fp32.
    """
    quantized_engine()
    default_a, default_w = default_bits()
    activation_bits = default_a if activation_bits is None else activation_bits
    weight_bits = default_w if weight_bits is None else weight_bits
    targets = _decoder_linears(model, lm_head)
    for full, _, _, lin in targets:
        if lin.weight.dtype != torch.float32:
            raise RuntimeError(f"{full} is {lin.weight.dtype}; quantize_model_int8 expects an fp32 model")
    report: dict = {"activation_bits": activation_bits, "weight_bits": weight_bits, "attention": None,
                    "quantized": [], "fused": [], "smoothed": [], "lm_head": "fp32",
                    "weight_bytes_fp32": 0, "weight_bytes_int8": 0}
    if calibration_ids:
        t0 = time.perf_counter()
        given = stats is not None
        if not given:
            stats = collect_activation_stats(model, calibration_ids, [t[0] for t in targets])
        report["calibration"] = summarise_stats(stats, calibration_ids, time.perf_counter() - t0)
        report["calibration"]["stats"] = "given" if given else "collected"
        if smooth_alpha:
            report["smoothed"] = smooth_model(model, stats, smooth_alpha)
            report["smooth_alpha"] = smooth_alpha
    by_parent: dict[int, dict[str, tuple[str, nn.Module, str, nn.Linear]]] = {}
    for t in targets:
        by_parent.setdefault(id(t[1]), {})[t[2]] = t
    done: set[str] = set()
    if fuse:
        for members in by_parent.values():
            for names in FUSED_GROUPS:
                if not all(n in members for n in names):
                    continue
                linears = [members[n][3] for n in names]
                if len({lin.in_features for lin in linears}) != 1:
                    continue
                group = FusedInt8Group(linears, activation_bits, weight_bits)
                for i, n in enumerate(names):
                    full, parent, attr, _ = members[n]
                    setattr(parent, attr, FusedInt8Member(group, i, owner=i == 0))
                    done.add(full)
                report["fused"].append([members[n][0] for n in names])
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for full, parent, attr, lin in targets:
        if full not in done:
            smooth = None
            if attr == "lm_head" and smooth_alpha and calibration_ids and stats and full in stats:
                # no norm to fold into (the final norm's output is the hidden state
                # draft heads read): the factors are applied inside the layer
                smooth = smooth_factors(stats[full].channel_absmax, [lin.weight], smooth_alpha)
                report["smoothed"].append(full)
            setattr(parent, attr, Int8Linear(lin.weight, lin.bias, activation_bits, weight_bits, smooth))
            if attr == "lm_head" and parent is model:
                report["lm_head"] = "int8, untied from the embedding" if tied else "int8"
        report["quantized"].append(full)
        report["weight_bytes_fp32"] += lin.weight.numel() * 4
        report["weight_bytes_int8"] += lin.weight.numel() + lin.out_features * 4
    if report["lm_head"] != "fp32" and tied:
        # The LM head is its own module now; keep transformers from re-tying it
        # to the embedding (e.g. on save or resize).
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    if invariant_attention:
        report["attention_kernel"] = use_invariant_attention(model)
        report["attention"] = INVARIANT_ATTENTION
        if report["attention_kernel"] != "cpp" and _KERNEL_STATE.get("error"):
            report["attention_kernel_error"] = _KERNEL_STATE["error"]
    return report


def quantize_target(target, calibration_ids: Optional[Sequence[torch.Tensor]] = None, use_cache: bool = True) -> dict:
    """:func:`quantize_model_int8` for an :class:`adaspec.target.TargetModel` (in place).

    Calibration defaults to :func:`default_calibration_ids` of the target's
    tokenizer (Spec-Bench questions through the chat template + Python stdlib
    source, both from the subset shipped in the package, so every machine
    calibrates alike); its statistics are cached on disk
    (:func:`cached_activation_stats`), so only the first int8 load of a model
    pays the calibration forwards. With ``use_cache`` the quantized model itself
    is cached too (:mod:`adaspec.quant.cache`): later loads build the int8 layers
    from it without reading the fp32 weights.

    Returns:
        the :func:`quantize_model_int8` report (with ``cache``: the file, when loaded from it).

    Raises:
        FileNotFoundError: the shipped calibration data is missing (a broken
            install): better than quietly quantizing another way.
    """
    from adaspec.quant import cache

    if calibration_ids is None:
        calibration_ids = default_calibration_ids(target.tokenizer)
    path = None
    if use_cache and calibration_ids:
        a_bits, w_bits = default_bits()
        key = cache.int8_cache_key(getattr(target.model, "name_or_path", "") or "", calibration_ids, a_bits, w_bits,
                                   DEFAULT_SMOOTH_ALPHA)
        path = cache.cache_path(key) if key else None
    if path is not None and path.exists():
        try:
            return cache.load_int8_model(target.model, path)
        except Exception as exc:  # a stale or damaged file: quantize again (the model is untouched)
            cache.note(f"int8 cache {path.name} unusable ({type(exc).__name__}: {exc}); quantizing again")
    stats = cached_activation_stats(target.model, calibration_ids) if calibration_ids else None
    report = quantize_model_int8(target.model, calibration_ids, stats=stats, smooth_alpha=DEFAULT_SMOOTH_ALPHA)
    if path is not None:
        try:
            cache.save_int8_model(target.model, report, path)
        except Exception as exc:  # a full or read-only disk: serve anyway
            cache.note(f"could not write the int8 cache {path} ({type(exc).__name__}: {exc})")
    return report
