"""Calibration for the int8 path: the texts, activation statistics (cached on disk), SmoothQuant.

The calibration and held-out texts are read from the prompt subset shipped in
the package (``adaspec/data/prompts``, see its SOURCES.md), never from
``$ADASPEC_PROMPTS`` or the shared folder, and the code texts from the Python
standard-library sources shipped there, not from the running interpreter's: so
the calibration ids, hence the int8 weights and scales, are the same on every
machine with the same tokenizer.
"""

from __future__ import annotations

import sys
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from adaspec.prompts import read_jsonl, shipped_prompts_root, spec_bench_own, task_number
from adaspec.quant.linear import TINY

# Python standard-library modules used as calibration code (plain source, PSF licence),
# shipped as adaspec/data/prompts/python_stdlib/<name>.py.txt.
STDLIB_CALIBRATION_MODULES = ("textwrap", "heapq", "fractions", "shlex")


# --------------------------------------------------------------------------- calibration texts


def calibration_texts(root: Optional[Path] = None, n_chat: int = 16, n_code: int = 8,
                      chars_per_code: int = 1000) -> list[tuple[str, str]]:
    """Texts for activation statistics, disjoint from :func:`held_out_texts`.

    Chat: ``n_chat`` Spec-Bench questions from its own categories (translation,
    summarization, QA, math reasoning, RAG; not its copy of MT-bench), evenly spread,
    rendered by the caller through the chat template. Code: ``n_code`` slices of
    ``chars_per_code`` characters from Python standard-library modules
    (:data:`STDLIB_CALIBRATION_MODULES`).

    Args:
        root: prompt folder (default: the shipped subset, which holds exactly
            the 16 questions that spreading over the full set picks, so the
            default texts are those of the full set).

    Returns:
        ``[(kind, text)]`` with kind "chat" or "code".
    """
    root = shipped_prompts_root() if root is None else Path(root)
    rows = spec_bench_own(root)
    step = max(1, len(rows) // max(1, n_chat))
    out = [("chat", r["turns"][0]) for r in rows[::step][:n_chat]]
    stdlib = shipped_prompts_root() / "python_stdlib"
    for name in STDLIB_CALIBRATION_MODULES:
        src = (stdlib / f"{name}.py.txt").read_text(encoding="utf-8")
        for start in range(0, len(src), chars_per_code):
            if sum(k == "code" for k, _ in out) >= n_code:
                break
            out.append(("code", src[start:start + chars_per_code]))
    return out


def held_out_texts(root: Optional[Path] = None, n_per_domain: int = 16) -> dict[str, list[str]]:
    """Held-out texts for perplexity, disjoint from :func:`calibration_texts`.

    - python: HumanEval prompt + canonical solution (every 10th task: 0, 10, ...);
    - rust: HumanEval-X Rust declaration + canonical solution (every 10th task);
    - chat: MT-bench first turns (every 5th; Spec-Bench's copy of MT-bench is not used for calibration).

    Tasks are picked by task number, so the shipped subset (default ``root``,
    every 5th task) and the full sets give the same texts.

    Returns:
        ``{domain: [text]}``.
    """
    root = shipped_prompts_root() if root is None else Path(root)
    he = [r for r in read_jsonl(root / "humaneval" / "HumanEval.jsonl") if task_number(r) % 10 == 0][:n_per_domain]
    rust = [r for r in read_jsonl(root / "humaneval_x_rust" / "humaneval_rust.jsonl")
            if task_number(r) % 10 == 0][:n_per_domain]
    mt = read_jsonl(root / "mt_bench" / "question.jsonl")[::5][:n_per_domain]
    return {
        "python": [r["prompt"] + r["canonical_solution"] for r in he],
        "rust": [r.get("prompt", r.get("declaration", "")) + r.get("canonical_solution", "") for r in rust],
        "chat": [r["turns"][0] for r in mt],
    }


def default_calibration_ids(tokenizer, root: Optional[Path] = None, max_tokens: int = 128) -> list[torch.Tensor]:
    """Token ids of :func:`calibration_texts`: chat texts through the chat template, code raw.

    Args:
        tokenizer: the target's tokenizer (``apply_chat_template`` used when it has a template).
        max_tokens: each sequence is cut to this many tokens.

    Returns:
        list of ``[T]`` int64 tensors, T <= max_tokens.
    """
    out = []
    for kind, text in calibration_texts(root):
        if kind == "chat" and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            ids = ids[0] if ids and isinstance(ids[0], list) else ids
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(list(ids), dtype=torch.long)[:max_tokens]
        if len(ids) >= 2:
            out.append(ids)
    return out


# --------------------------------------------------------------------------- activation statistics



@dataclass
class ActivationStats:
    """Input statistics of one linear layer over the calibration tokens.

    Attributes:
        tokens: rows seen.
        absmax: max |x| over all tokens and channels.
        token_absmax_p50, token_absmax_p99: percentiles of each token's max |x|
            (the per-token scale numerator the int8 path uses).
        outlier_ratio: largest per-channel absmax over the median channel's
            (how much one channel dominates; SmoothQuant's motivation).
        channel_absmax: ``[K]`` float32 max |x| per input channel.
    """

    tokens: int = 0
    absmax: float = 0.0
    token_absmax_p50: float = 0.0
    token_absmax_p99: float = 0.0
    outlier_ratio: float = 0.0
    channel_absmax: Optional[torch.Tensor] = field(default=None, repr=False)


@torch.inference_mode()
def collect_activation_stats(model: nn.Module, calibration_ids: Sequence[torch.Tensor],
                             names: Optional[Iterable[str]] = None) -> dict[str, ActivationStats]:
    """Run ``model`` (fp32) on each sequence and summarise every ``nn.Linear`` input.

    Args:
        model: a transformers causal LM.
        calibration_ids: ``[T]`` int64 tensors, one forward each (no cache).
        names: restrict to these module names (default: every ``nn.Linear``).

    Returns:
        ``{module name: ActivationStats}``.
    """
    wanted = set(names) if names is not None else None
    chan: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (wanted is None or name in wanted):
            def hook(_m, inputs, name=name):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs()  # [tokens, K]
                c = x.amax(dim=0)
                chan[name] = c if name not in chan else torch.maximum(chan[name], c)
                rows.setdefault(name, []).append(x.amax(dim=1))
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for ids in calibration_ids:
            model(input_ids=torch.as_tensor(ids).reshape(1, -1), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    stats = {}
    for name, c in chan.items():
        r = torch.cat(rows[name])
        stats[name] = ActivationStats(
            tokens=int(r.numel()), absmax=float(c.max()),
            token_absmax_p50=float(r.quantile(0.5)), token_absmax_p99=float(r.quantile(0.99)),
            outlier_ratio=float(c.max() / c.median().clamp_min(TINY)), channel_absmax=c.float())
    return stats


def _scales_output_linearly(norm: nn.Module, width: int) -> bool:
    """Whether dividing ``norm.weight`` by s divides the norm's output by s (RMSNorm/LayerNorm yes, Gemma's 1+w no)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != (width,):
        return False
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    s = torch.linspace(0.5, 2.0, width)
    with torch.no_grad():
        before = norm(x)
        saved = w.detach().clone()
        w.div_(s)
        after = norm(x)
        w.copy_(saved)
    return torch.allclose(after * s, before, rtol=1e-4, atol=1e-5)


def smooth_factors(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor ``s = max|x|^a / max|W|^(1-a)`` (``[K]``), 1 where undefined."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [K]
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


@torch.no_grad()
def smooth_model(model: nn.Module, stats: dict[str, ActivationStats], alpha: float = 0.5) -> list[str]:
    """Fold SmoothQuant factors into the fp32 weights, in place (Xiao et al. 2023, arXiv:2211.10438).

    Per decoder layer, with ``s`` from :func:`smooth_factors` on the calibration
    statistics (exact in real arithmetic, so the fp32 model computes the same
    function up to rounding):

    - q/k/v input: ``input_layernorm.weight /= s``; q/k/v weight columns ``*= s``;
    - gate/up input: ``post_attention_layernorm.weight /= s``; their columns ``*= s``;
    - down_proj input (``act(gate) * up``): ``up_proj`` rows (and bias) ``/= s``;
      down_proj columns ``*= s``.

    The final norm and the LM head are left alone (the final norm's output is
    the hidden state that draft heads read). A norm whose output does not scale
    with its weight (e.g. Gemma's ``1 + w``) is skipped.

    Args:
        model: transformers decoder with ``*.layers.N.{input_layernorm,self_attn,
            post_attention_layernorm,mlp}`` (llama, qwen2, mistral layouts).
        stats: :func:`collect_activation_stats` of that model, before smoothing.
        alpha: migration strength, 0 (none) .. 1 (all onto the weights).

    Returns:
        names of the smoothed linear layers.
    """
    done = []
    for name, layer in model.named_modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        groups = []
        if attn is not None and hasattr(layer, "input_layernorm"):
            groups.append((layer.input_layernorm, [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")],
                           f"{name}.self_attn.q_proj"))
        if mlp is not None and hasattr(layer, "post_attention_layernorm"):
            groups.append((layer.post_attention_layernorm, [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")],
                           f"{name}.mlp.gate_proj"))
        for norm, linears, key in groups:
            if key not in stats or not all(isinstance(lin, nn.Linear) for lin in linears):
                continue
            if not _scales_output_linearly(norm, linears[0].in_features):
                continue
            s = smooth_factors(stats[key].channel_absmax, [lin.weight for lin in linears], alpha)
            norm.weight.div_(s)
            for lin in linears:
                lin.weight.mul_(s)
            done += [key.rsplit(".", 1)[0] + "." + n for n in (("q_proj", "k_proj", "v_proj") if "self_attn" in key
                                                                 else ("gate_proj", "up_proj"))]
        up, down = getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)
        key = f"{name}.mlp.down_proj"
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and key in stats:
            s = smooth_factors(stats[key].channel_absmax, [down.weight], alpha)
            up.weight.div_(s[:, None])
            if up.bias is not None:
                up.bias.div_(s)
            down.weight.mul_(s)
            done.append(key)
    return done


# Projections that read the same input tensor, fused into one matmul when all present.

def summarise_stats(stats: dict[str, ActivationStats], calibration_ids, seconds: float) -> dict:
    """Per layer kind (q_proj, down_proj, ...): the worst case over layers."""
    kinds: dict[str, dict] = {}
    for name, s in stats.items():
        kind = name.rsplit(".", 1)[-1]
        k = kinds.setdefault(kind, {"layers": 0, "absmax": 0.0, "token_absmax_p99": 0.0, "outlier_ratio": 0.0})
        k["layers"] += 1
        k["absmax"] = max(k["absmax"], round(s.absmax, 3))
        k["token_absmax_p99"] = max(k["token_absmax_p99"], round(s.token_absmax_p99, 3))
        k["outlier_ratio"] = max(k["outlier_ratio"], round(s.outlier_ratio, 1))
    return {"sequences": len(calibration_ids), "tokens": int(sum(len(t) for t in calibration_ids)),
            "seconds": round(seconds, 2), "by_kind": kinds}


_STATS_VERSION = "1"  # bump when ActivationStats or the calibration texts change


def _fingerprint(model: nn.Module, calibration_ids: Sequence[torch.Tensor]) -> str:
    """sha256 over the config, a strided sample of every weight, and the calibration ids."""
    h = hashlib.sha256(_STATS_VERSION.encode())
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().contiguous()
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(sample.numpy().tobytes())
    for ids in calibration_ids:
        h.update(torch.as_tensor(ids, dtype=torch.long).contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


def cached_activation_stats(model: nn.Module, calibration_ids: Sequence[torch.Tensor],
                            cache_dir: Optional[Path] = None) -> dict[str, ActivationStats]:
    """:func:`collect_activation_stats` of every ``nn.Linear``, cached on disk.

    The cache file is keyed by :func:`_fingerprint` (config, sampled weights,
    calibration ids), so another model or calibration set never reuses it.

    Args:
        model: the fp32 model, before any smoothing or quantization.
        calibration_ids: ``[T]`` int64 tensors.
        cache_dir: default ``<adaspec cache>/quant``.

    Returns:
        ``{module name: ActivationStats}``.
    """
    if cache_dir is None:
        from adaspec.models import cache_root

        cache_dir = cache_root() / "quant"
    path = Path(cache_dir) / f"activation-stats-{_fingerprint(model, calibration_ids)}.pt"
    if path.exists():
        try:
            raw = torch.load(path, weights_only=True)
            return {name: ActivationStats(**fields) for name, fields in raw.items()}
        except Exception:  # a truncated or stale file: recompute
            pass
    print("adaspec: calibrating int8 activation scales (once per model; about a minute)...", file=sys.stderr,
          flush=True)
    stats = collect_activation_stats(model, calibration_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({name: asdict(st) for name, st in stats.items()}, tmp)
    tmp.replace(path)  # atomic: readers never see a partial file
    return stats

