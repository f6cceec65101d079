"""Int8 linear layers: per-channel int8 weights, per-token activation scales, fbgemm matmuls.

A row's result depends only on that row (the integer matmul is exact and every
other step is elementwise or per row), so these layers are bitwise
batch-invariant along the token dimension; see :mod:`adaspec.quant`.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

_FBGEMM_ENGINES = ("x86", "fbgemm")
TINY = 1e-30  # floor for a row's absmax, so an all-zero row does not divide by zero



def quantized_engine() -> str:
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


def _quantize_weight(weight: torch.Tensor, weight_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight per output channel (symmetric).

    Args:
        weight: ``[N, K]`` float weight.
        weight_bits: 8 (levels -127..127) or 7 (-63..63).

    Returns:
        ``(w_int8 [N, K] int8, w_scale [N] float32)``; ``w_int8 * w_scale[:, None]``
        is the dequantized weight.
    """
    w = weight.detach().float()
    w_scale = (w.abs().amax(dim=1).clamp_min(TINY) / float(2 ** (weight_bits - 1) - 1)).float()  # [N]
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # quantized tensors are deprecated for removal in a future torch; 2.13 is pinned.
        warnings.simplefilter("ignore")
        wq = torch.quantize_per_channel(w, w_scale.double(), zero, 0, torch.qint8)
    return wq.int_repr(), w_scale


def _prepack(w_int8: torch.Tensor, w_scale: torch.Tensor) -> object:
    """fbgemm's packed form of an int8 weight (``[N, K]`` int8, ``[N]`` float32 scale)."""
    zero = torch.zeros(w_int8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wq = torch._make_per_channel_quantized_tensor(w_int8.contiguous(), w_scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(wq, None)


def _pack_int8(weight: torch.Tensor, weight_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, object]:
    """:func:`_quantize_weight` and fbgemm's packed form: ``(w_int8, w_scale, packed)``."""
    w_int8, w_scale = _quantize_weight(weight, weight_bits)
    return w_int8, w_scale, _prepack(w_int8, w_scale)


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
        quantized_engine()
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
        quantized_engine()
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
        w_int8, w_scale = _quantize_weight(weight, weight_bits)
        self._set_int8(w_int8, w_scale, None if bias is None else bias.detach().float().clone())

    def _set_int8(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        self.register_buffer("w_scale", w_scale, persistent=False)
        self._w_int8_data = w_int8  # 1 byte per weight: the lean core and dequantized_weight() read it
        self._int8_source = None  # (safetensors file, key) it can be read back from, see release_int8
        self._packed_weight = None  # fbgemm's copy, packed on the first forward (the lean core never needs it)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_int8(cls, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  inv_smooth: Optional[torch.Tensor] = None, activation_bits: int = 8,
                  weight_bits: int = 8) -> "Int8Linear":
        """An Int8Linear from already quantized parts (as :mod:`adaspec.quant.cache` stores them).

        Args:
            w_int8: ``[N, K]`` int8 weight; w_scale: ``[N]`` float32 per-channel scale;
            bias: ``[N]`` float32 or None; inv_smooth: ``[K]`` float32 (1 / SmoothQuant
            factors applied to the input) or None.

        Raises:
            ValueError: shapes or dtypes that do not fit, or a bit width not in (7, 8).
        """
        if activation_bits not in (7, 8) or weight_bits not in (7, 8):
            raise ValueError(f"bit widths must be 7 or 8, got {activation_bits} (activations), {weight_bits} (weights)")
        if w_int8.dtype != torch.int8 or w_int8.dim() != 2 or tuple(w_scale.shape) != (w_int8.shape[0],):
            raise ValueError(f"w_int8 must be [N, K] int8 and w_scale [N], got {tuple(w_int8.shape)} "
                             f"{w_int8.dtype} and {tuple(w_scale.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = w_int8.shape
        self.activation_bits, self.weight_bits = activation_bits, weight_bits
        self.q_max = float(2 ** (activation_bits - 1) - 1)
        self.zero_point = int(self.q_max) + 1
        self.inv_smooth = None if inv_smooth is None else nn.Parameter(inv_smooth.float(), requires_grad=False)
        self._set_int8(w_int8, w_scale.float(), None if bias is None else bias.float())
        return self

    @property
    def _w_int8(self) -> torch.Tensor:
        """``[N, K]`` int8 weight (read back from its file if :meth:`release_int8` dropped it)."""
        if self._w_int8_data is None:
            from adaspec.quant.cache import read_tensors

            path, key = self._int8_source
            self._w_int8_data = read_tensors(path, [key])[key]
        return self._w_int8_data

    def release_int8(self) -> bool:
        """Drop the int8 weight from memory if it can be read back from a file (the int8
        model cache); True if dropped. The lean core calls this once it holds its own copy."""
        if self._int8_source is None or self._packed_weight is not None:
            return False
        self._w_int8_data = None
        return True

    @property
    def _packed(self) -> object:
        if self._packed_weight is None:
            quantized_engine()
            self._packed_weight = _prepack(self._w_int8, self.w_scale)
        return self._packed_weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: Optional[int] = None,
                    weight_bits: Optional[int] = None) -> "Int8Linear":
        """Build from an ``nn.Linear`` (its weight and bias are copied, not shared)."""
        return cls(linear.weight, linear.bias, activation_bits, weight_bits)

    def dequantized_weight(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, K]`` float32: the weight this module effectively multiplies its input by
        (``[len(rows), K]``: only the output rows ``rows``, int64)."""
        if rows is None:
            w = self._w_int8.float() * self.w_scale[:, None]
        else:
            w = self._w_int8[rows].float() * self.w_scale[rows][:, None]
        return w if self.inv_smooth is None else w * self.inv_smooth[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., K]`` float32 -> ``[..., N]`` float32."""
        if self.inv_smooth is not None:
            x = x * self.inv_smooth  # [..., K], elementwise: rows stay independent
        # x: [..., K]; s: [..., 1] one scale per row (token), from that row only
        # (abs().amax() is exact in any order and much faster than vector_norm(ord=inf) for M > 1)
        s = x.abs().amax(dim=-1, keepdim=True).clamp_min_(TINY) / self.q_max
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

    @classmethod
    def from_linear(cls, linear: Int8Linear, bounds: Sequence[int]) -> "FusedInt8Group":
        """A group over an already stacked :class:`Int8Linear`; member i owns rows ``bounds[i]:bounds[i+1]``.

        Raises:
            ValueError: bounds that do not start at 0, increase, and end at ``linear.out_features``.
        """
        bounds = [int(b) for b in bounds]
        if bounds[0] != 0 or bounds[-1] != linear.out_features or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds {bounds} do not split {linear.out_features} rows")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.linear = linear
        self.bounds = bounds
        self._stash = threading.local()
        return self

    def __getstate__(self):  # deepcopy / pickle: the per-thread stash is not state
        state = self.__dict__.copy()
        state.pop("_stash", None)
        return state

    def __setstate__(self, state):
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

