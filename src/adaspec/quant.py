"""Fast, batch-invariant int8 path for the target model.

Speculative decoding is lossless only if a token's logits do not depend on how
many other tokens share its forward: 1 in plain decoding, k+1 in verification
(DESIGN.md, "Exactness depends on batch invariance"). fp32 is not bitwise
invariant here (MKL picks GEMV at 1 row and blocked GEMM above; SDPA likewise),
and torch's ``quantize_dynamic`` int8 uses one activation scale per tensor, so
a token's quantization depends on its batch companions. This module makes a
transformers decoder-only model *bitwise* batch-invariant along the token
dimension, by construction, and fast at small token counts:

- **Int8Linear** replaces every ``nn.Linear`` of the decoder layers and the LM
  head (untied from the fp32 embedding). Weights: symmetric int8, one scale per
  output channel. Activations: int8 with one scale per *token* (row), taken from
  that row alone. fbgemm (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``)
  multiplies the row-normalised input at a fixed unit scale; integer
  accumulation is exact, so however fbgemm blocks a given M, a row's result
  cannot change. q/k/v and gate/up run as one fused matmul each
  (:class:`FusedInt8Group`, bitwise equal to separate layers). SmoothQuant
  factors from a short calibration run are folded into the norms / up_proj
  (:func:`smooth_model`) to tame activation outliers.
- **Invariant attention** (``"adaspec_invariant"`` in transformers'
  ``AttentionInterface``): for forwards of T <= ``MAX_INVARIANT_TOKENS`` new
  tokens every output row is computed by the same fixed sequence of float
  operations whatever T is -- a small C++ kernel built on first use
  (:func:`attention_kernel`), or, where it cannot be built, one
  ``scaled_dot_product_attention`` call per query (the call plain decoding makes).

RMSNorm, rotary, SiLU and residual adds work row by row; the tests check the
whole model position by position (:func:`check_batch_invariance`).

Glossary: *invariant* = ``torch.equal`` between the logits of a position
computed in a forward of 1 token and in a forward of T tokens over the same
cache. *Step cost* = wall milliseconds of one forward of k new tokens on a
cached prompt (:func:`measure_step_cost`).
"""

from __future__ import annotations

import json
import os
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

INVARIANT_ATTENTION = "adaspec_invariant"
# Forwards with at most this many new tokens take the invariant attention path;
# longer ones (prompt prefill) one batched causal SDPA call.
MAX_INVARIANT_TOKENS = 64
_FBGEMM_ENGINES = ("x86", "fbgemm")
_TINY = 1e-30  # floor for a row's absmax, so an all-zero row does not divide by zero


# --------------------------------------------------------------------------- int8 linear


def _quantized_engine() -> str:
    """Select an fbgemm-backed quantized engine, or raise if this CPU has none."""
    engine = torch.backends.quantized.engine
    if engine in _FBGEMM_ENGINES:
        return engine
    for candidate in _FBGEMM_ENGINES:
        if candidate in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = candidate
            return candidate
    raise RuntimeError(
        "the int8 path needs torch's fbgemm/x86 quantized engine (an x86 CPU with AVX2); "
        f"this build supports {torch.backends.quantized.supported_engines}"
    )


def _pack_int8(weight: torch.Tensor, weight_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Quantize a weight per output channel (symmetric) and prepack it for fbgemm.

    Args:
        weight: ``[N, K]`` float weight.
        weight_bits: 8 (levels -127..127) or 7 (-63..63).

    Returns:
        ``(w_int8 [N, K] int8, w_scale [N] float32, packed)``; ``w_int8 * w_scale[:, None]``
        is the dequantized weight.
    """
    w = weight.detach().float()
    w_scale = (w.abs().amax(dim=1).clamp_min(_TINY) / float(2 ** (weight_bits - 1) - 1)).float()  # [N]
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # quantized tensors are deprecated for removal in a future torch; 2.13 is pinned.
        warnings.simplefilter("ignore")
        wq = torch.quantize_per_channel(w, w_scale.double(), zero, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(wq, None)
    return wq.int_repr(), w_scale, packed


_SATURATES: Optional[bool] = None


def fbgemm_saturates() -> bool:
    """Whether fbgemm's u8 x s8 kernel saturates on this CPU (no AVX512-VNNI).

    Without VNNI, fbgemm sums pairs of u8 x s8 products in int16 with saturation
    (255 * 127 * 2 > 32767), so full 8-bit activations can lose precision. The
    probe multiplies an all-max input by an all-max weight and compares with the
    exact answer; the result is cached for the process. (Saturation is a
    function of each product pair alone, so it never breaks batch invariance,
    only accuracy.)

    Returns:
        True if 8-bit activations x 8-bit weights would saturate here
        (:func:`default_bits` then picks 7-bit weights).
    """
    global _SATURATES
    if _SATURATES is None:
        _quantized_engine()
        K = 64
        _, _, packed = _pack_int8(torch.ones(16, K))  # int8 weights all 127
        x = torch.full((1, K), 127.0)  # quantizes to u8 255 with zero point 128
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, 128, packed)
        _SATURATES = not torch.allclose(y, torch.full_like(y, 127.0 * K), rtol=1e-3)
    return _SATURATES


def default_bits() -> tuple[int, int]:
    """``(activation_bits, weight_bits)`` for this CPU: (8, 8), or (8, 7) where fbgemm saturates.

    With 7-bit weights a u8 x s8 pair sums to at most 2 * 255 * 63 = 32130 and
    cannot saturate int16; on SmolLM2 that costs less perplexity than 7-bit
    activations (per-token activation ranges are dominated by outlier channels,
    per-channel weight ranges are not).
    """
    return (8, 7) if fbgemm_saturates() else (8, 8)


class Int8Linear(nn.Module):
    """A batch-invariant int8 replacement for ``nn.Linear`` (fbgemm, fp32 in and out).

    Math, per row x of the input (one token)::

        s   = max|x| / q_max                   # this row's scale, q_max = 127 (63 at 7 bits)
        x_q = round(x / s) + zp                # u8, zp = q_max + 1; fbgemm's scale is 1.0
        y   = s * w_scale * (x_q - zp) @ W_int^T + bias

    The integer matmul is exact, every other step is elementwise or per row, so
    ``y`` for a row depends only on that row. Weights: symmetric, one scale per
    output channel; bias (if any) stays fp32.

    Attributes:
        in_features, out_features: K and N.
        activation_bits, weight_bits: 8 or 7 each (see :func:`default_bits`).
        w_scale: ``[N]`` float32 per-channel weight scale (buffer).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 activation_bits: Optional[int] = None, weight_bits: Optional[int] = None,
                 input_smooth: Optional[torch.Tensor] = None):
        """Quantize ``weight`` (``[N, K]`` float) and keep ``bias`` (``[N]`` float or None).

        Args:
            activation_bits, weight_bits: default :func:`default_bits`. 8 x 8
                saturates (loses accuracy, stays invariant) where
                :func:`fbgemm_saturates`.
            input_smooth: ``[K]`` SmoothQuant factors s applied inside the layer
                (input ``/ s``, weight columns ``* s``) where they cannot be
                folded into a preceding norm (the LM head).

        Raises:
            ValueError: a bit width not in (7, 8).
            RuntimeError: no fbgemm engine on this CPU.
        """
        super().__init__()
        _quantized_engine()
        default_a, default_w = default_bits()
        activation_bits = default_a if activation_bits is None else activation_bits
        weight_bits = default_w if weight_bits is None else weight_bits
        if activation_bits not in (7, 8) or weight_bits not in (7, 8):
            raise ValueError(f"bit widths must be 7 or 8, got {activation_bits} (activations), {weight_bits} (weights)")
        self.out_features, self.in_features = weight.shape
        self.activation_bits = activation_bits
        self.weight_bits = weight_bits
        self.q_max = float(2 ** (activation_bits - 1) - 1)  # 127 or 63
        self.zero_point = int(self.q_max) + 1  # 128 or 64: x_q in [1, 2 * q_max + 1]
        weight = weight.detach().float()
        self.inv_smooth = None
        if input_smooth is not None:
            weight = weight * input_smooth.float()[None, :]
            self.inv_smooth = nn.Parameter((1.0 / input_smooth.float()).clone(), requires_grad=False)
        w_int8, w_scale, self._packed = _pack_int8(weight, weight_bits)
        self.register_buffer("w_scale", w_scale, persistent=False)
        self._w_int8 = w_int8  # kept for dequantized_weight(); 1 byte per weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: Optional[int] = None,
                    weight_bits: Optional[int] = None) -> "Int8Linear":
        """Build from an ``nn.Linear`` (its weight and bias are copied, not shared)."""
        return cls(linear.weight, linear.bias, activation_bits, weight_bits)

    def dequantized_weight(self) -> torch.Tensor:
        """``[N, K]`` float32: the weight this module effectively multiplies its input by."""
        w = self._w_int8.float() * self.w_scale[:, None]
        return w if self.inv_smooth is None else w * self.inv_smooth[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., K]`` float32 -> ``[..., N]`` float32."""
        if self.inv_smooth is not None:
            x = x * self.inv_smooth  # [..., K], elementwise: rows stay independent
        # x: [..., K]; s: [..., 1] one scale per row (token), from that row only
        # (abs().amax() is exact in any order and much faster than vector_norm(ord=inf) for M > 1)
        s = x.abs().amax(dim=-1, keepdim=True).clamp_min_(_TINY) / self.q_max
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x / s, 1.0, self.zero_point, self._packed
        )  # [..., N]
        y = y.mul_(s)  # in place: y is fbgemm's fresh output
        if self.bias is not None:
            y = y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation_bits={self.activation_bits}, weight_bits={self.weight_bits}, bias={self.bias is not None}")


class FusedInt8Group(nn.Module):
    """Several projections of the same input (q/k/v, or gate/up) as one :class:`Int8Linear`.

    The members' weights are stacked along the output dimension, so the input
    row is normalised and quantized once and fbgemm runs one matmul. Each output
    column is the same exact integer dot product as in a separate layer, with
    the same per-channel weight scale and per-row activation scale, so the
    result is bitwise equal to the unfused layers.

    The model keeps calling its members (``q_proj``, ``k_proj``, ...): the first
    call on an input computes all outputs; the others get their slice when
    called on the *same tensor object* (``is``), and any other input is computed
    afresh. The stash is per thread and dropped once every member has been
    served, so it never holds activations past the layer.
    """

    def __init__(self, linears: Sequence[nn.Linear], activation_bits: Optional[int] = None,
                 weight_bits: Optional[int] = None):
        super().__init__()
        import threading

        weight = torch.cat([lin.weight.detach().float() for lin in linears])  # [sum N_i, K]
        biases = [lin.bias for lin in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(lin.out_features)
                              for b, lin in zip(biases, linears)])
        self.linear = Int8Linear(weight, bias, activation_bits, weight_bits)
        bounds = [0]
        for lin in linears:
            bounds.append(bounds[-1] + lin.out_features)
        self.bounds = bounds
        self._stash = threading.local()  # .input, .output, .served

    def __getstate__(self):  # deepcopy / pickle: the per-thread stash is not state
        state = self.__dict__.copy()
        state.pop("_stash", None)
        return state

    def __setstate__(self, state):
        import threading

        self.__dict__.update(state)
        self._stash = threading.local()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output for ``x`` (``[..., K]`` -> ``[..., N_index]``, a view)."""
        st = self._stash
        if getattr(st, "input", None) is not x or index in st.served:
            st.output = self.linear(x)  # [..., sum N_i]
            st.input, st.served = x, set()
        out = st.output[..., self.bounds[index]:self.bounds[index + 1]]
        st.served.add(index)
        if len(st.served) == len(self.bounds) - 1:
            st.input = st.output = None
        return out


class FusedInt8Member(nn.Module):
    """Stands in for one projection of a :class:`FusedInt8Group` (``q_proj``, ``up_proj``, ...)."""

    def __init__(self, group: FusedInt8Group, index: int, owner: bool):
        super().__init__()
        if owner:
            self.group = group  # registered once, under the first member
        else:
            self._group_ref = (group,)  # a tuple hides it from module registration
        self.index = index
        self.in_features = group.linear.in_features
        self.out_features = group.bounds[index + 1] - group.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group if "group" in self._modules else self._group_ref[0]
        return group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, member={self.index}"


# --------------------------------------------------------------------------- invariant attention

# C++ source of the attention kernel, built once per machine with
# torch.utils.cpp_extension.load_inline (needs g++ and ninja). Every output row is
# computed by the same fixed sequence of float operations whatever the number of
# queries in the call, and K/V are read once for all queries.
_ATTENTION_CPP = r"""
// Batch-invariant causal attention for one sequence (see adaspec/quant.py).
// Every output row is computed by the same fixed sequence of float operations,
// whatever the number of queries T in the call: dot products in 8 fixed lanes
// over the head dimension then a fixed tree; softmax sum in 8 lanes by key
// index then a fixed tree; weighted sum over keys in key order. No scalar tails.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

namespace {
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t W = 8;  // lanes
constexpr int64_t PARALLEL_MIN_WORK = 1 << 20;  // multiply-adds per phase below which one thread runs

template <typename F>
void run(bool parallel, int64_t n, const F& f) {
  if (parallel) at::parallel_for(0, n, 1, f); else f(0, n);
}

inline v8f load(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float tree_sum(v8f p) {  // fixed order: ((p0+p4)+(p2+p6)) + ((p1+p5)+(p3+p7))
  const float a0 = p[0] + p[4], a1 = p[1] + p[5], a2 = p[2] + p[6], a3 = p[3] + p[7];
  return (a0 + a2) + (a1 + a3);
}
// exp(x) for x <= 0 (Cephes expf polynomial), lane by lane.
inline v8f exp_nonpos(v8f x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(0.0f) ? splat(0.0f) : x;
  const v8f n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
  v8f r = x - n * splat(0.693359375f);
  r = r + n * splat(2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8f)bits;
}

template <int64_t ND>  // ND = D / W, 0 = runtime
void attend(const float* qp, const float* kp, const float* vp, float* sp, float* op, int64_t T, int64_t H,
            int64_t D, int64_t Hkv, int64_t S, float scale) {
  const int64_t nd = ND ? ND : D / W;
  const int64_t n_rep = H / Hkv, R = T * n_rep;
  const int64_t nblk = (S + W - 1) / W, Spad = nblk * W;
  constexpr int64_t KB = 32;  // keys per scoring task
  const int64_t nkb = (S + KB - 1) / KB;
  // Small calls run on the calling thread: a parallel region's barrier costs more
  // than the work (and stalls badly when another process holds the other core).
  const bool par = Hkv * R * S * D >= PARALLEL_MIN_WORK;
  run(par, Hkv * nkb, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / nkb, l0 = (task % nkb) * KB, l1 = std::min(l0 + KB, S);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t lend = std::min(l1, S - T + t + 1);  // keys visible to query t
        for (int64_t r = 0; r < n_rep; ++r) {
          const float* qr = qp + (t * H + g * n_rep + r) * D;
          float* srow = sp + (g * R + t * n_rep + r) * Spad;
          for (int64_t l = l0; l < lend; ++l) {
            const float* kr = kp + (g * S + l) * D;
            v8f part = load(qr) * load(kr);
            for (int64_t c = 1; c < nd; ++c) part = part + load(qr + c * W) * load(kr + c * W);
            srow[l] = tree_sum(part) * scale;
          }
        }
      }
    }
  });
  run(par, Hkv * R, [&](int64_t begin, int64_t end) {
    std::vector<float> ebuf(Spad);
    float* e = ebuf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / R, row = task % R;
      const int64_t t = row / n_rep, r = row % n_rep;
      const int64_t n_keys = S - T + t + 1;
      const int64_t nb = (n_keys + W - 1) / W;
      const float* srow = sp + (g * R + row) * Spad;
      float m = srow[0];
      for (int64_t l = 1; l < n_keys; ++l) m = srow[l] > m ? srow[l] : m;
      v8f lane = splat(0.0f);
      const v8i idx = {0, 1, 2, 3, 4, 5, 6, 7};
      for (int64_t b = 0; b < nb; ++b) {
        v8f y = exp_nonpos(load(srow + b * W) - splat(m));
        const v8i valid = idx < (v8i){0, 0, 0, 0, 0, 0, 0, 0} + (int32_t)(n_keys - b * W);
        y = valid ? y : splat(0.0f);  // keys past this query (or padding) weigh exactly 0
        store(e + b * W, y);
        lane = lane + y;
      }
      const float denom = tree_sum(lane);
      v8f acc[ND ? ND : 32];
      for (int64_t c = 0; c < nd; ++c) acc[c] = splat(0.0f);
      const float* vg = vp + g * S * D;
      for (int64_t l = 0; l < n_keys; ++l) {
        const v8f el = splat(e[l]);
        const float* vr = vg + l * D;
        for (int64_t c = 0; c < nd; ++c) acc[c] = acc[c] + el * load(vr + c * W);
      }
      float* orow = op + (t * H + g * n_rep + r) * D;
      const v8f dv = splat(denom);
      for (int64_t c = 0; c < nd; ++c) store(orow + c * W, acc[c] / dv);
    }
  });
}
}  // namespace

// q: [T, H, D], k, v: [Hkv, S, D] float32; query t sits at position S - T + t.
// Returns [T, H, D].
torch::Tensor invariant_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scaling) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "float32 only");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0), S = k.size(1);
  TORCH_CHECK(H % Hkv == 0 && k.size(2) == D && v.size(1) == S && v.size(2) == D && T <= S && T >= 1,
              "bad shapes");
  TORCH_CHECK(D % W == 0 && D <= 32 * W, "head dim must be a multiple of 8 and at most 256");
  const int64_t Spad = (S + W - 1) / W * W;
  auto out = torch::empty({T, H, D}, q.options());
  auto scores = torch::empty({Hkv, T * (H / Hkv), Spad}, q.options());
  const float s = static_cast<float>(scaling);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *sp = scores.data_ptr<float>(), *op = out.data_ptr<float>();
  switch (D / W) {
    case 4: attend<4>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s); break;
    case 8: attend<8>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s); break;
    case 16: attend<16>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s); break;
    default: attend<0>(qp, kp, vp, sp, op, T, H, D, Hkv, S, s);
  }
  return out;
}
"""

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
    import hashlib
    import os

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
            try:  # the PyPI `ninja` package (requirements.lock) puts its binary beside the venv's python
                import ninja

                if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
                    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
            from torch.utils.cpp_extension import load_inline

            from adaspec.models import cache_root

            digest = hashlib.sha256(_ATTENTION_CPP.encode()).hexdigest()[:12]
            name = f"adaspec_invariant_attention_{digest}"
            build_dir = cache_root() / "torch_extensions" / name
            build_dir.mkdir(parents=True, exist_ok=True)
            module = load_inline(name=name, cpp_sources=[_ATTENTION_CPP], functions=["invariant_attention"],
                                 extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=fast"],
                                 build_directory=str(build_dir), verbose=False)
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


# --------------------------------------------------------------------------- calibration data


# Prompt sets are found the same way as the benchmarks find them.
from adaspec.bench.prompts import _jsonl, prompts_root  # noqa: E402


# Spec-Bench's own categories; its other 80 rows (writing, roleplay, ...) are
# MT-bench's questions, which held_out_texts() uses.
_SPEC_BENCH_OWN = ("translation", "summarization", "qa", "math_reasoning", "rag")
# Python standard-library modules used as calibration code (plain source, MIT-compatible PSF licence).
_STDLIB_CALIBRATION_MODULES = ("textwrap", "heapq", "fractions", "shlex")


def calibration_texts(root: Optional[Path] = None, n_chat: int = 16, n_code: int = 8,
                      chars_per_code: int = 1000) -> list[tuple[str, str]]:
    """Texts for activation statistics, disjoint from :func:`held_out_texts`.

    Chat: ``n_chat`` Spec-Bench questions from its own categories (translation,
    summarization, QA, math reasoning, RAG; not its copy of MT-bench), evenly spread,
    rendered by the caller through the chat template. Code: ``n_code`` slices of
    ``chars_per_code`` characters from Python standard-library modules
    (:data:`_STDLIB_CALIBRATION_MODULES`).

    Returns:
        ``[(kind, text)]`` with kind "chat" or "code".
    """
    import importlib

    root = prompts_root() if root is None else root
    rows = [r for r in _jsonl(root / "spec_bench" / "question.jsonl") if r.get("category") in _SPEC_BENCH_OWN]
    step = max(1, len(rows) // max(1, n_chat))
    out = [("chat", r["turns"][0]) for r in rows[::step][:n_chat]]
    for name in _STDLIB_CALIBRATION_MODULES:
        src = Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")
        for start in range(0, len(src), chars_per_code):
            if sum(k == "code" for k, _ in out) >= n_code:
                break
            out.append(("code", src[start:start + chars_per_code]))
    return out


def held_out_texts(root: Optional[Path] = None, n_per_domain: int = 16) -> dict[str, list[str]]:
    """Held-out texts for perplexity, disjoint from :func:`calibration_texts`.

    - python: HumanEval prompt + canonical solution (every 10th task);
    - rust: HumanEval-X Rust declaration + canonical solution (every 10th task);
    - chat: MT-bench first turns (every 5th; Spec-Bench's copy of MT-bench is not used for calibration).

    Returns:
        ``{domain: [text]}``.
    """
    root = prompts_root() if root is None else root
    he = _jsonl(root / "humaneval" / "HumanEval.jsonl")[::10][:n_per_domain]
    rust = _jsonl(root / "humaneval_x_rust" / "humaneval_rust.jsonl")[::10][:n_per_domain]
    mt = _jsonl(root / "mt_bench" / "question.jsonl")[::5][:n_per_domain]
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


# --------------------------------------------------------------------------- quantize a model


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
            outlier_ratio=float(c.max() / c.median().clamp_min(_TINY)), channel_absmax=c.float())
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


def _smooth_factors(x_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor ``s = max|x|^a / max|W|^(1-a)`` (``[K]``), 1 where undefined."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [K]
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


@torch.no_grad()
def smooth_model(model: nn.Module, stats: dict[str, ActivationStats], alpha: float = 0.5) -> list[str]:
    """Fold SmoothQuant factors into the fp32 weights, in place (Xiao et al. 2023, arXiv:2211.10438).

    Per decoder layer, with ``s`` from :func:`_smooth_factors` on the calibration
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
            s = _smooth_factors(stats[key].channel_absmax, [lin.weight for lin in linears], alpha)
            norm.weight.div_(s)
            for lin in linears:
                lin.weight.mul_(s)
            done += [key.rsplit(".", 1)[0] + "." + n for n in (("q_proj", "k_proj", "v_proj") if "self_attn" in key
                                                                 else ("gate_proj", "up_proj"))]
        up, down = getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)
        key = f"{name}.mlp.down_proj"
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and key in stats:
            s = _smooth_factors(stats[key].channel_absmax, [down.weight], alpha)
            up.weight.div_(s[:, None])
            if up.bias is not None:
                up.bias.div_(s)
            down.weight.mul_(s)
            done.append(key)
    return done


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
                        lm_head: bool = True, smooth_alpha: Optional[float] = 0.5,
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
    _quantized_engine()
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
        report["calibration"] = _summarise_stats(stats, calibration_ids, time.perf_counter() - t0)
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
                smooth = _smooth_factors(stats[full].channel_absmax, [lin.weight], smooth_alpha)
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


def _summarise_stats(stats: dict[str, ActivationStats], calibration_ids, seconds: float) -> dict:
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
    import hashlib

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
    stats = collect_activation_stats(model, calibration_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({name: asdict(st) for name, st in stats.items()}, tmp)
    tmp.replace(path)  # atomic: readers never see a partial file
    return stats


def quantize_target(target, calibration_ids: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """:func:`quantize_model_int8` for an :class:`adaspec.target.TargetModel` (in place).

    Calibration defaults to :func:`default_calibration_ids` of the target's
    tokenizer (Spec-Bench questions through the chat template + Python stdlib
    source); its statistics are cached on disk (:func:`cached_activation_stats`),
    so only the first int8 load of a model pays the calibration forwards. Without
    the shared prompt folder the model is quantized without smoothing.

    Returns:
        the :func:`quantize_model_int8` report.
    """
    if calibration_ids is None:
        try:
            calibration_ids = default_calibration_ids(target.tokenizer)
        except FileNotFoundError:
            calibration_ids = None
    stats = cached_activation_stats(target.model, calibration_ids) if calibration_ids else None
    return quantize_model_int8(target.model, calibration_ids, stats=stats)


# --------------------------------------------------------------------------- measurements


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer_or_ids, texts: Optional[Sequence[str]] = None,
               max_tokens: int = 512) -> dict:
    """Token-level perplexity of ``model`` on held-out text.

    One forward per sequence (no cache), mean negative log-likelihood over all
    predicted tokens of all sequences, ``exp`` of it.

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
    if isinstance(tokenizer_or_ids, (list, tuple)):
        seqs = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in tokenizer_or_ids]
    else:
        if texts is None:
            raise ValueError("perplexity with a tokenizer needs texts")
        seqs = [torch.as_tensor(tokenizer_or_ids(t)["input_ids"], dtype=torch.long) for t in texts]
    total, count = 0.0, 0
    for ids in seqs:
        ids = ids[:max_tokens]
        if len(ids) < 2:
            continue
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()  # [T-1, V]
        total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        count += len(ids) - 1
    if count == 0:
        raise ValueError("no sequence with at least 2 tokens")
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


@torch.inference_mode()
def measure_step_cost(model: nn.Module, ks: Iterable[int] = range(1, 17), repeats: int = 9,
                      prompt_len: int = 128, warmup: int = 2) -> dict[int, float]:
    """Median wall milliseconds of one forward of k new tokens on a cached prompt.

    The cache (a ``DynamicCache``) is cropped back to ``prompt_len`` after every
    forward, so every measurement sees the same prefix; the k values are
    interleaved within each repeat so machine noise spreads over all of them.
    Logits are computed for all k positions (as verification needs).

    Args:
        model: a transformers causal LM (fp32 or after :func:`quantize_model_int8`).
        ks: token counts per forward (k = 1 is plain decoding).
        repeats: timed forwards per k (median taken).
        prompt_len: cached prefix length in tokens.
        warmup: untimed rounds over all ks first.

    Returns:
        ``{k: median_ms}``.
    """
    from transformers import DynamicCache

    ks = list(ks)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, prompt_len), generator=g)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, cache=cache, use_cache=True)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(warmup + repeats):
        for k in ks:
            ids = torch.randint(0, vocab, (1, k), generator=g)
            t0 = time.perf_counter()
            model(input_ids=ids, cache=cache, use_cache=True)
            dt = (time.perf_counter() - t0) * 1000.0
            cache.crop(-k)
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


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
