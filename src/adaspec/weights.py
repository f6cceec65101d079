"""New policy weights into a running target (RL: the trainer updates the policy every round).

Two halves, so a server can build the new weights while it keeps serving:

1. :func:`prepare_weights` (slow, touches nothing served): read the new fp32
   weights (a safetensors file or folder, or a state dict with the names of
   the transformers model), build a fresh transformers module from the served
   config, quantize it for int8 with the *existing calibration* (the initial
   policy's activation statistics, so SmoothQuant factors are recomputed from
   the same activations and the new weights; ``calibration="recalibrate"``
   collects new statistics on the new weights instead, ~a minute for the
   default model), and build the lean kernel's copy of them.
2. :func:`apply_weights` (fast): the prepared weights become the current ones.

Which requests see which weights: a request's KV cache is pinned to the
weights it was created with (:class:`adaspec.model.kv.LeanKVCache.weights`), so
a request started before an update finishes on the old weights, and one
started after runs on the new ones from its prefill on; none runs on a mix.
The old weights are freed when their last request ends.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import torch

CALIBRATIONS = ("initial", "recalibrate")

StateSource = Union[str, Path, Mapping[str, torch.Tensor]]


@dataclass
class PreparedWeights:
    """New weights built by :func:`prepare_weights`, not yet served.

    Attributes:
        model: the new transformers module (quantized in place for int8).
        kernel: the lean decoder's prepared copy (None on the transformers runtime).
        quant_report: :func:`adaspec.quant.quantize_model_int8`'s report (empty for fp32).
        num_tensors: tensors read from the source.
    """

    model: Any
    kernel: Any = None
    quant_report: dict = field(default_factory=dict)
    num_tensors: int = 0


def read_state_dict(source: StateSource) -> dict[str, torch.Tensor]:
    """Tensors by name from a ``.safetensors`` file, a folder of them, or a mapping.

    Raises:
        ValueError: no such file, no safetensors in the folder, or a value that is not a tensor.
    """
    if isinstance(source, Mapping):
        out = {}
        for k, v in source.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
            out[str(k)] = v
        return out
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no .safetensors file in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"no weights file or folder at {path}")
    from safetensors.torch import load_file

    out = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as exc:  # a truncated or foreign file
            raise ValueError(f"cannot read {f.name} as safetensors: {exc}") from exc
    return out


def _fp32_module(target, state: dict[str, torch.Tensor]):
    """A fresh fp32 transformers module of the served architecture holding ``state``.

    Raises:
        ValueError: missing, unknown, misshapen or non-finite tensors.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(target.model.config)
    tied = _originally_tied(target)
    config.tie_word_embeddings = tied
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if tied:
        state.pop("lm_head.weight", None)  # one tensor under two names; the embedding holds it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    expected = dict(model.state_dict())
    if tied:
        expected.pop("lm_head.weight", None)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown:
        raise ValueError(f"{len(unknown)} tensors the model does not have, e.g. {unknown[:3]}")
    if missing:
        raise ValueError(f"{len(missing)} of the model's tensors missing, e.g. {missing[:3]} "
                         "(send every weight, with the transformers model's names)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)}, the model's is {tuple(expected[k].shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{k}: dtype {v.dtype} is not floating point")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{k}: holds NaN or infinite values")
    with torch.no_grad():
        model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, strict=False)
        if tied:
            model.tie_weights()
    return model


def _originally_tied(target) -> bool:
    """Whether the model's LM head was tied to its embedding before int8 untied it."""
    tied = getattr(target, "_policy_tied", None)
    if tied is None:
        report = target.quant_report or {}
        tied = bool(getattr(target.model.config, "tie_word_embeddings", False)) or \
            report.get("lm_head") == "int8, untied from the embedding"
        target._policy_tied = tied
    return tied


def _initial_stats(target, calibration_ids):
    """The initial policy's activation statistics (kept on the target after the first update)."""
    stats = getattr(target, "_policy_stats", None)
    if stats is None:
        from transformers import AutoModelForCausalLM

        from adaspec.models import resolve_model
        from adaspec.quant.calibration import cached_activation_stats

        initial = AutoModelForCausalLM.from_pretrained(resolve_model(target.name), dtype=torch.float32).eval()
        stats = cached_activation_stats(initial, calibration_ids)  # on disk since the first int8 load
        del initial
        target._policy_stats = stats
    return stats


def _fresh_load_stats(model, calibration_ids, collect):
    """Activation statistics of ``model`` computed as a fresh int8 load computes them: the served
    config carries the invariant attention, but a fresh load calibrates before installing it (with
    transformers' default, sdpa). Another attention kernel moves the statistics in the last bits,
    which can move a SmoothQuant factor and so an int8 weight's rounding."""
    configs = [model.config] + [getattr(model.config, n, None) for n in ("text_config", "decoder")]
    configs = [c for c in configs if c is not None and hasattr(c, "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "sdpa"
        return collect(model, calibration_ids)
    finally:
        for c, v in zip(configs, saved):
            c._attn_implementation = v


def prepare_weights(target, source: StateSource, calibration: str = "initial") -> PreparedWeights:
    """Build new weights for ``target`` without touching what it serves.

    Args:
        target: a loaded :class:`adaspec.target.TargetModel` (lean or transformers runtime).
        source: safetensors file / folder, or a ``{name: tensor}`` state dict
            with the transformers model's names (``model.layers.0.self_attn.q_proj.weight``,
            ...; a tied ``lm_head.weight`` may be left out). Any float dtype; used as fp32.
        calibration: int8 only: "initial" (default: the initial policy's cached
            activation statistics) or "recalibrate" (new statistics on the new weights).

    Returns:
        the :class:`PreparedWeights` for :func:`apply_weights`.

    Raises:
        ValueError: unreadable source, missing / unknown / misshapen / non-finite
            tensors, an unknown ``calibration``.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    state = read_state_dict(source)
    model = _fp32_module(target, state)
    report: dict = {}
    if target.dtype == "int8":
        from adaspec.quant.calibration import collect_activation_stats, default_calibration_ids
        from adaspec.quant.convert import DEFAULT_SMOOTH_ALPHA, quantize_model_int8

        ids = default_calibration_ids(target.tokenizer)
        if calibration == "initial":
            stats = _initial_stats(target, ids)
        else:
            stats = _fresh_load_stats(model, ids, collect_activation_stats)
        report = quantize_model_int8(model, ids, stats=stats, smooth_alpha=DEFAULT_SMOOTH_ALPHA)
        report["policy_calibration"] = calibration
    kernel = None
    decoder = getattr(target, "decoder", None)
    if decoder is not None:
        kernel = decoder.prepare_weights(model)
    return PreparedWeights(model=model, kernel=kernel, quant_report=report, num_tensors=len(state))


def apply_weights(target, prepared: PreparedWeights, live_requests: int = 0) -> int:
    """Serve ``prepared`` from now on; returns the new weights version.

    On the lean core, live requests keep the weights their KV cache is pinned
    to. The transformers runtime has one module and no pinning, so there the
    update is refused while any request is live.

    Raises:
        RuntimeError: transformers runtime with ``live_requests`` > 0.
    """
    decoder = getattr(target, "decoder", None)
    if decoder is None:
        if live_requests:
            raise RuntimeError(f"{live_requests} requests are running; the transformers runtime swaps weights "
                               "only between requests (the lean core pins each request to its weights)")
        target.model = prepared.model
        target.policy_version = getattr(target, "policy_version", 0) + 1
        return target.policy_version
    version = decoder.swap_weights(prepared.kernel)
    target.model = prepared.model
    if prepared.quant_report:
        target.quant_report = prepared.quant_report
    target.policy_version = version
    return version


def policy_version(target) -> int:
    """The target's weights version: 0 as loaded, +1 per :func:`apply_weights`."""
    decoder = getattr(target, "decoder", None)
    return decoder.weights_version if decoder is not None else getattr(target, "policy_version", 0)

