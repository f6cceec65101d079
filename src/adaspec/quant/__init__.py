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
  operations whatever T is -- a small C++ kernel (``invariant_attention.cpp``)
  built on first use (:func:`attention_kernel`), or, where it cannot be built,
  one ``scaled_dot_product_attention`` call per query (the call plain decoding
  makes).

RMSNorm, rotary, SiLU and residual adds work row by row; the tests check the
whole model position by position (:func:`check_batch_invariance`).

Glossary: *invariant* = ``torch.equal`` between the logits of a position
computed in a forward of 1 token and in a forward of T tokens over the same
cache. *Step cost* = wall milliseconds of one forward of k new tokens on a
cached prompt (:func:`adaspec.step_cost.measure_step_cost`).

Modules (this package re-exports their public names):

- :mod:`~adaspec.quant.linear`: :class:`Int8Linear`, :class:`FusedInt8Group`
  / :class:`FusedInt8Member`, the fbgemm helpers (:func:`default_bits`);
- :mod:`~adaspec.quant.attention`: the invariant attention and its kernel;
- :mod:`~adaspec.quant.calibration`: calibration and held-out texts,
  activation statistics (cached on disk), SmoothQuant;
- :mod:`~adaspec.quant.convert`: :func:`quantize_model_int8`, :func:`quantize_target`;
- :mod:`~adaspec.quant.checks`: :func:`perplexity`, :func:`runtime_perplexity`, :func:`check_batch_invariance`.
"""

from adaspec.quant.attention import (
    _KERNEL_STATE,
    INVARIANT_ATTENTION,
    MAX_INVARIANT_TOKENS,
    attention_kernel,
    invariant_attention_forward,
    use_invariant_attention,
)
from adaspec.quant.calibration import (
    STDLIB_CALIBRATION_MODULES,
    ActivationStats,
    cached_activation_stats,
    calibration_texts,
    collect_activation_stats,
    default_calibration_ids,
    held_out_texts,
    smooth_model,
)
from adaspec.quant.checks import InvarianceResult, check_batch_invariance, perplexity, runtime_perplexity
from adaspec.quant.convert import FUSED_GROUPS, quantize_model_int8, quantize_target
from adaspec.quant.linear import (
    FusedInt8Group,
    FusedInt8Member,
    Int8Linear,
    default_bits,
    fbgemm_saturates,
)

__all__ = [
    "INVARIANT_ATTENTION", "MAX_INVARIANT_TOKENS", "attention_kernel", "invariant_attention_forward",
    "use_invariant_attention",
    "STDLIB_CALIBRATION_MODULES", "ActivationStats", "cached_activation_stats", "calibration_texts",
    "collect_activation_stats", "default_calibration_ids", "held_out_texts", "smooth_model",
    "InvarianceResult", "check_batch_invariance", "perplexity", "runtime_perplexity",
    "FUSED_GROUPS", "quantize_model_int8", "quantize_target",
    "FusedInt8Group", "FusedInt8Member", "Int8Linear", "default_bits", "fbgemm_saturates",
]
