"""Draft head: a small network on the target's hidden states (the static speculator).

Follows EAGLE (Li et al. 2024, arXiv 2401.15077): autoregression at the
*feature* level. The engine hands over ``f``, the target's last-layer hidden
state (after the final norm) at the position that predicted the newest token
``x``; the head predicts the feature of the next position from ``f`` and the
embedding of ``x``, and the target's own (frozen) LM head turns that feature
into next-token probabilities. Chaining the head on its own predicted features
drafts k tokens::

    f_1 = Head(f, emb(x));      draft d_1 ~ LMHead_d(f_1)
    f_2 = Head(f_1, emb(d_1));  draft d_2 ~ LMHead_d(f_2)   ...

Departures from EAGLE, for cost on a 2-core CPU (drafting must stay under
~10% of a target forward per draft token) and because the engine passes one
hidden state per step:

- **no attention**: Head is a gated-MLP residual block, not a decoder layer;
  ``f`` already summarises the context as the target saw it.
- **a context successor instead**: what attention over the context buys a
  drafter most is copying (code repeats its prompt's names; answers quote
  their question). The speculator keeps a per-request n-gram index of the
  committed tokens (the drafted chain overlaid while drafting) and gives the
  head, besides ``emb(x)``, the embedding of the token that followed the most
  recent earlier occurrence of the context's longest suffix (up to
  ``context_ngram`` tokens, prompt lookup's rule) and that suffix's length.
  The head learns when to trust it. On held-out target answers the successor
  alone matches the target's next token about half the time.
- **reduced draft vocabulary** (FR-Spec, Zhao et al. 2025, arXiv 2502.14856;
  EAGLE-3's ``d2t`` map): the draft LM head holds only the ``Vd`` rows of the
  target's LM head for the most frequent target tokens of the training corpus
  (e.g. 8192 of 49152); ``draft_to_target`` maps a draft id back to a target
  id. The full LM head alone costs ~20% of a target forward here.

Exactness: ``draft_probs`` over the full vocabulary are zero outside the draft
vocabulary. Rejection sampling stays exact for any draft distribution from
which the draft token was actually sampled (a sampled token always has
``draft_probs > 0``), so the restriction costs acceptance, never correctness.

Glossary (see ``adaspec.types`` for the shared terms):

- **feature**: a target last-layer hidden state after the final norm, ``[H]``;
  ``feature[t]`` is what the LM head reads to predict token ``t + 1``.
- **draft vocabulary**: the ``Vd`` target token ids the head can draft;
  **draft id**: an index into it.
- **chain**: the k drafts of one step, each conditioned on the previous ones.
- **context successor** of position t: the token after the most recent
  earlier occurrence (ending before t) of the longest suffix of ``tokens[:t+1]``
  of length n <= ``context_ngram``; its **match length** n is 0 when none.

The checkpoint (safetensors, fp16) holds the head's weights, the LM-head rows
of the draft vocabulary, and ``draft_to_target``; the token embeddings are the
target's own and are read from the target at load time. This module never
imports transformers: it reads only tensors from the target object.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from adaspec.sampling import process_logits
from adaspec.speculators.base import Speculator, coupled_draft, draft_probs_matrix, draft_sampler, draft_token
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext, TokenTree, TreeClaim

CHECKPOINT_FORMAT = "adaspec.draft_head"
CHECKPOINT_VERSION = 1

# The LM-head rows in a checkpoint are fp16; a target whose rows differ by more
# than this (relative to the largest row weight) is a different model.
_LM_HEAD_MATCH_TOLERANCE = 2e-2
_LM_HEAD_CHECK_STRIDE = 8  # check_matches_target compares every 8th draft row


@dataclass
class DraftHeadConfig:
    """Shape of a draft head.

    Attributes:
        hidden_size: H, the target's hidden size.
        draft_vocab_size: Vd, rows of the draft LM head (<= target_vocab_size).
        target_vocab_size: V, rows of the target's LM head.
        intermediate_size: width of each gated-MLP block. Default 1536.
        num_blocks: gated-MLP residual blocks. Default 1.
        context_ngram: longest suffix matched for the context successor. Default 3.
        rms_norm_eps: epsilon of the RMS norms. Default 1e-5.
        target_name: the target model the head was trained for (informative).
    """

    hidden_size: int
    draft_vocab_size: int
    target_vocab_size: int
    intermediate_size: int = 1536
    num_blocks: int = 1
    context_ngram: int = 3
    rms_norm_eps: float = 1e-5
    target_name: str = ""


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (as in the llama family)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMLPBlock(nn.Module):
    """``x + down(silu(gate(n(x))) * up(n(x)))``; ``down`` starts at zero so a new block is the identity."""

    def __init__(self, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class DraftHeadNet(nn.Module):
    """``feature_next = Head(feature, emb(token), emb(successor), match_length)`` and its logits.

    Layout: RMS-normalise the feature, the token embedding and the context
    successor's embedding separately (they live at different scales; a missing
    successor stays zero), concatenate, project ``3H -> H``, add a learned
    vector per match length, apply the gated-MLP blocks, and finish with an RMS
    norm whose scale starts from the target's final norm, so the output lives
    where target features live.

    Buffers (saved with the weights, never trained):
        lm_head: ``[Vd, H]`` the target's LM-head rows of the draft vocabulary.
        draft_to_target: ``[Vd]`` int64 target id of each draft id.
    """

    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        H, Vd = config.hidden_size, config.draft_vocab_size
        if not 0 < Vd <= config.target_vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..{config.target_vocab_size}, got {Vd}")
        self.config = config
        self.feature_norm = RMSNorm(H, config.rms_norm_eps)
        self.token_norm = RMSNorm(H, config.rms_norm_eps)
        self.successor_norm = RMSNorm(H, config.rms_norm_eps)
        self.fc_in = nn.Linear(3 * H, H, bias=False)
        self.match_embed = nn.Embedding(config.context_ngram + 1, H)
        nn.init.zeros_(self.match_embed.weight)
        self.blocks = nn.ModuleList(
            [GatedMLPBlock(H, config.intermediate_size, config.rms_norm_eps) for _ in range(config.num_blocks)]
        )
        self.out_norm = RMSNorm(H, config.rms_norm_eps)
        self.register_buffer("lm_head", torch.zeros(Vd, H))
        self.register_buffer("draft_to_target", torch.arange(Vd, dtype=torch.long))

    def forward(self, feature: torch.Tensor, token_emb: torch.Tensor, successor_emb: torch.Tensor,
                match_length: torch.Tensor) -> torch.Tensor:
        """Predict the next position's feature.

        Args:
            feature: ``[N, H]`` float32, the feature that predicted each token.
            token_emb: ``[N, H]`` float32, the target's embedding of that token.
            successor_emb: ``[N, H]`` float32, the target's embedding of the
                token's context successor (zeros where there is none).
            match_length: ``[N]`` int64 in ``0..context_ngram`` (0: no successor).

        Returns:
            ``[N, H]`` float32 predicted feature of the token's own position.
        """
        x = torch.cat([self.feature_norm(feature), self.token_norm(token_emb),
                       self.successor_norm(successor_emb)], dim=-1)  # [N, 3H]
        x = self.fc_in(x) + self.match_embed(match_length)  # [N, H]
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` features -> ``[N, Vd]`` draft-vocabulary logits (the frozen LM-head rows)."""
        int8_head = getattr(self, "lm_head_int8", None)  # set by quantize_head only
        if int8_head is not None:
            return int8_head(feature)
        return feature @ self.lm_head.t()

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def quantize_head(net: DraftHeadNet) -> DraftHeadNet:
    """An int8 inference copy of ``net`` (drafting only; training uses the float head).

    ``fc_in``, the blocks' linears and the draft LM head become
    :class:`adaspec.quant.Int8Linear` (fbgemm int8; one weight scale per output
    channel, one activation scale per token). Drafting one token reads ~8M
    weights, which in fp32 (~33 MB) is bound by memory bandwidth; int8 reads a
    quarter of the bytes (timings: BENCHMARKS.md).
    The draft distribution changes slightly; exactness does not depend on it.

    Raises:
        RuntimeError: no fbgemm quantized engine on this CPU.
    """
    import copy

    from adaspec.quant import Int8Linear

    q = copy.deepcopy(net).eval()
    q.fc_in = Int8Linear(net.fc_in.weight)
    for qb, b in zip(q.blocks, net.blocks):
        qb.gate, qb.up, qb.down = Int8Linear(b.gate.weight), Int8Linear(b.up.weight), Int8Linear(b.down.weight)
    q.lm_head_int8 = Int8Linear(net.lm_head)
    return q


def successor_inputs(embed: torch.Tensor, successor: torch.Tensor, match_length: torch.Tensor) -> torch.Tensor:
    """``[N]`` successor ids (-1 = none) -> ``[N, H]`` embeddings, zero where there is none."""
    emb = embed[successor.clamp(min=0)]  # [N, H]
    return emb * (match_length > 0).unsqueeze(-1).to(emb.dtype)


# ---------------------------------------------------------------- context successors
NO_SUCCESSOR = -1


class ContextIndex:
    """Most recent end position of every n-gram (n = 1..max_ngram) of a token sequence.

    ``add(tokens, p)`` records the n-grams ending at position p;
    ``successor(tokens, t)`` looks up the longest suffix of ``tokens[:t+1]``
    among the n-grams added so far (which must all end before t) and returns
    ``(tokens[p + 1], n)`` for its most recent occurrence p, or
    ``(NO_SUCCESSOR, 0)``. An optional ``overlay`` index (more recent
    positions, e.g. a draft chain) is searched first for each n.
    """

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram
        self.last: list[dict] = [dict() for _ in range(max_ngram + 1)]  # last[n]: ngram -> end position

    def add(self, tokens: Sequence[int], p: int) -> None:
        for n in range(1, min(self.max_ngram, p + 1) + 1):
            self.last[n][tuple(tokens[p - n + 1 : p + 1])] = p

    def successor(self, tokens: Sequence[int], t: int, overlay: Optional["ContextIndex"] = None) -> tuple[int, int]:
        for n in range(min(self.max_ngram, t + 1), 0, -1):
            key = tuple(tokens[t - n + 1 : t + 1])
            p = overlay.last[n].get(key) if overlay is not None else None
            if p is None:
                p = self.last[n].get(key)
            if p is not None:
                return int(tokens[p + 1]), n
        return NO_SUCCESSOR, 0


def context_successors(tokens: Sequence[int], max_ngram: int) -> tuple[list[int], list[int]]:
    """Context successor and match length at every position of ``tokens`` (see the glossary).

    Returns:
        ``(successor, match_length)``, two lists of ``len(tokens)`` ints.
    """
    index = ContextIndex(max_ngram)
    succ, length = [], []
    for t in range(len(tokens)):
        s, n = index.successor(tokens, t)
        succ.append(s)
        length.append(n)
        index.add(tokens, t)
    return succ, length


# ---------------------------------------------------------------- the target's tensors
def target_embedding_weight(target: Any) -> torch.Tensor:
    """``[V, H]`` float32 input embeddings of a loaded target (``adaspec.target.TargetModel``)."""
    fast = _fast_tensors(target)
    if fast is not None:
        return fast.embedding_weight()
    return target.model.model.embed_tokens.weight.detach()


def _fast_tensors(target: Any) -> Any:
    """The target's tensors read without its framework module, where it offers them
    (``current_fast_tensors()``: a target loaded straight from its int8 cache), else None."""
    get = getattr(target, "current_fast_tensors", None)
    return get() if callable(get) else None


def target_lm_head_weight(target: Any, rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``[V, H]`` float32 LM-head weight of a target (``[len(rows), H]``: only ``rows``),
    or None when it is not a dense tensor.

    A quantized LM head is dequantized: ``adaspec.quant.Int8Linear`` (its
    ``dequantized_weight(rows)``, so a draft vocabulary's rows never cost the
    whole fp32 head) or ``torch.ao`` dynamic int8 (whose ``weight`` is a method
    returning a quantized tensor).
    """
    fast = _fast_tensors(target)
    if fast is not None:
        return fast.lm_head_weight(rows)
    head = target.model.lm_head
    if callable(getattr(head, "dequantized_weight", None)):
        return head.dequantized_weight(rows).detach().float()
    w = getattr(head, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):
        w = w()
    if isinstance(w, torch.Tensor):
        if w.is_quantized:
            w = w.dequantize()
        w = w.detach()
        return (w if rows is None else w[rows]).float()
    return None


def target_final_norm_weight(target: Any) -> Optional[torch.Tensor]:
    """``[H]`` scale of the target's final norm (where features live), or None."""
    fast = _fast_tensors(target)
    if fast is not None:
        return fast.final_norm_weight()
    norm = getattr(target.model.model, "norm", None)
    w = getattr(norm, "weight", None)
    return w.detach().float() if isinstance(w, torch.Tensor) else None


def new_draft_head(target: Any, draft_vocab: Sequence[int], intermediate_size: int = 1536,
                   num_blocks: int = 1, context_ngram: int = 3, seed: int = 0) -> DraftHeadNet:
    """A fresh (untrained) head for ``target`` with the given draft vocabulary.

    Args:
        target: a loaded target model.
        draft_vocab: Vd distinct target token ids, most useful first.
        intermediate_size / num_blocks / context_ngram: see :class:`DraftHeadConfig`.
        seed: initialisation seed.

    Raises:
        ValueError: empty, duplicated or out-of-range draft vocabulary, or a
            target without a dense LM head.
    """
    V = int(target.vocab_size)
    ids = [int(t) for t in draft_vocab]
    if not ids or len(set(ids)) != len(ids) or not all(0 <= t < V for t in ids):
        raise ValueError(f"draft vocabulary must be distinct ids in 0..{V - 1}, got {len(ids)} ids")
    lm = target_lm_head_weight(target)
    if lm is None:
        raise ValueError("the target's LM head is not a dense tensor; train the head on a float32 target")
    emb = target_embedding_weight(target)
    cfg = DraftHeadConfig(hidden_size=int(emb.shape[1]), draft_vocab_size=len(ids), target_vocab_size=V,
                          intermediate_size=intermediate_size, num_blocks=num_blocks,
                          context_ngram=context_ngram, target_name=str(target.name))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DraftHeadNet(cfg)
    idx = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        net.lm_head.copy_(lm[idx])
        net.draft_to_target.copy_(idx)
        norm = target_final_norm_weight(target)
        if norm is not None and norm.shape == net.out_norm.weight.shape:
            net.out_norm.weight.copy_(norm)
    return net


# ---------------------------------------------------------------- checkpoints
def save_draft_head(net: DraftHeadNet, path: str | Path, training: Optional[dict] = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write ``net`` as a safetensors checkpoint (weights in ``dtype``, ids int64).

    Args:
        net: the head.
        path: output file (``.safetensors``); written atomically.
        training: JSON-serialisable notes (data, steps, held-out numbers).
        dtype: storage dtype of the float tensors. Default float16.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in net.state_dict().items():
        t = t.detach().cpu()
        tensors[name] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "config": json.dumps(asdict(net.config)),
        "training": json.dumps(training or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_draft_head(path: str | Path) -> tuple[DraftHeadNet, dict]:
    """Read a checkpoint written by :func:`save_draft_head`; weights come back as float32.

    Returns:
        ``(net, training_notes)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a draft-head checkpoint, or an unknown version.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no draft-head checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a draft-head checkpoint (format {meta.get('format')!r})")
        if meta.get("version") != str(CHECKPOINT_VERSION):
            raise ValueError(f"{path}: unsupported draft-head checkpoint version {meta.get('version')!r}")
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = DraftHeadConfig(**json.loads(meta["config"]))
    net = DraftHeadNet(cfg)
    # copied in place, converting as it copies: no float32 copy of the whole state (start-up peak memory)
    net.load_state_dict(state)
    net.eval()
    return net, json.loads(meta.get("training") or "{}")


def shipped_checkpoint_path(target_name: str) -> Path:
    """Where the packaged checkpoint for ``target_name`` lives (it may not exist)."""
    return Path(__file__).resolve().parent.parent / "data" / f"draft_head-{target_name}.safetensors"


# ---------------------------------------------------------------- the drafting runtime
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:class:`RMSNorm`'s exact operations (bitwise its result), optionally written into ``out``."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.mul(x * r, weight, out=out) if out is not None else x * r * weight


def _lean_kernel_or_none() -> Any:
    """The lean core's compiled extension (:func:`adaspec.model.build.lean_kernel`), or None where it is unavailable."""
    try:
        from adaspec.model.build import lean_kernel

        return lean_kernel()
    except (RuntimeError, ImportError):
        return None


def _int8_linear(weight: torch.Tensor, ext: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """An int8 ``[M, K] -> [M, N]`` linear for a ``[N, K]`` float weight, and which kernel runs it.

    The weight is quantized by :class:`adaspec.quant.Int8Linear` (per output
    channel; its bit widths). With the lean core's extension ``ext`` the lean
    int8 GEMM runs it: Int8Linear's documented math exactly (``x_q =
    round(x / s)``, an exact integer dot product, the same scales) and several
    times cheaper than fbgemm at M = 1. fbgemm rounds ``x / s + zp`` instead,
    so where ``x / s`` lies within float rounding of a half the two differ by
    one quantization level (int8 rounding, rare). Without ``ext``, or where the
    lean kernel refuses the shape, fbgemm runs it.

    Raises:
        RuntimeError: no fbgemm quantized engine on this CPU (Int8Linear needs it).
    """
    from adaspec.quant import Int8Linear

    lin = Int8Linear(weight)
    if ext is not None:
        try:
            handle = ext.make_linear(lin._w_int8.contiguous(), lin.w_scale.float().contiguous(), None, None,
                                     lin.activation_bits)
            return functools.partial(ext.linear, handle), "lean"
        except RuntimeError:  # e.g. in_features not a multiple of 8
            pass
    return lin.forward, "fbgemm"


_NORMED_CACHE_ROWS = 4096  # normalised embeddings a runtime caches per norm (~9 MB at H = 576)


class _DraftRuntime:
    """Everything drafting derives from one :class:`DraftHeadNet`, built once by
    :meth:`DraftHeadSpeculator._prepare`.

    A request drafts with one runtime from its start to its end, so a head
    swapped in later (a new runtime) never mixes with the old one inside a
    request. Holds: the float net, its ``[M, K] -> [M, N]`` linears (int8, or
    the float modules' weights), the gated-MLP blocks' gate and up projections
    fused into one matmul where int8 (per output row the same integer dot
    product and scales, so bitwise equal to the separate layers), the match
    embeddings as rows, and the draft vocabulary as a list and a tensor. Its
    only mutable state is a bounded cache of normalised token embeddings (per
    token id, each computed once), so several threads may draft with one runtime.

    Math: :meth:`DraftHeadNet.forward` and :meth:`DraftHeadNet.logits` op for op,
    without the module call overhead: the float runtime is bitwise the float
    net; the int8 one is :func:`quantize_head`'s copy with each linear's math
    as :func:`_int8_linear` runs it (bitwise that copy where fbgemm runs it).

    Attributes:
        net: the float32 head (eval mode, no gradients) this runtime was built from.
        config: ``net.config``.
        int8: whether the linears run in int8.
        kernel: "lean", "fbgemm" or "float32": what runs the linears (the LM head's kernel when mixed).
        draft_to_target: ``[Vd]`` int64 target id of each draft id; draft_to_target_list: the same as a list.
    """

    def __init__(self, net: DraftHeadNet, int8: bool) -> None:
        self.net = net
        self.config = cfg = net.config
        self.hidden_size = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.draft_to_target = net.draft_to_target
        self.draft_to_target_list: list[int] = net.draft_to_target.tolist()
        self.feature_norm_w = net.feature_norm.weight
        self.token_norm_w = net.token_norm.weight
        self.successor_norm_w = net.successor_norm.weight
        self.out_norm_w = net.out_norm.weight
        self.match_rows = [net.match_embed.weight[n : n + 1] for n in range(cfg.context_ngram + 1)]  # [1, H] each
        self._token_rows: dict[int, torch.Tensor] = {}  # token id -> [1, H] token_norm(embedding)
        self._successor_rows: dict[int, torch.Tensor] = {}  # token id -> [1, H] successor_norm(embedding)
        self.int8 = False
        self.kernel = "float32"
        if int8:
            try:
                self._build_int8()
                self.int8 = True
            except (RuntimeError, ImportError):
                pass  # no fbgemm here: draft in float32
        if not self.int8:
            self._build_float()

    def _build_float(self) -> None:
        net = self.net
        self.fc_in = functools.partial(nn.functional.linear, weight=net.fc_in.weight)
        # (norm weight, gate, up, down, None): the float blocks keep separate gate and up matmuls
        self.blocks = [(b.norm.weight, functools.partial(nn.functional.linear, weight=b.gate.weight),
                        functools.partial(nn.functional.linear, weight=b.up.weight),
                        functools.partial(nn.functional.linear, weight=b.down.weight), None) for b in net.blocks]
        lm_head_t = net.lm_head.t()
        self.lm_head = lambda x: x @ lm_head_t  # as DraftHeadNet.logits
        self.kernel = "float32"

    def _build_int8(self) -> None:
        net = self.net
        ext = _lean_kernel_or_none()
        self.fc_in, _ = _int8_linear(net.fc_in.weight, ext)
        self.blocks = []
        for b in net.blocks:
            gate_up, _ = _int8_linear(torch.cat([b.gate.weight, b.up.weight]), ext)  # [2I, H]
            down, _ = _int8_linear(b.down.weight, ext)
            self.blocks.append((b.norm.weight, gate_up, None, down, b.gate.out_features))
        self.lm_head, self.kernel = _int8_linear(net.lm_head, ext)

    def step(self, feature: torch.Tensor, embed: torch.Tensor, token: int, successor: int,
             match_length: int) -> torch.Tensor:
        """One chain step, :meth:`forward` for one row from token ids (bitwise the same result).

        The normalised embeddings of a token (as the token and as a context
        successor) depend on its id alone and are cached per id.

        Args:
            feature: ``[1, H]`` float32.
            embed: ``[V, H]`` float32 target embeddings.
            token: the token's id; successor: its context successor's id, used when ``match_length > 0``.

        Returns:
            ``[1, H]`` float32 predicted feature.
        """
        H, eps = self.hidden_size, self.eps
        x = torch.empty(1, 3 * H)  # [1, 3H], the concatenated normalised inputs
        _rms_norm(feature, self.feature_norm_w, eps, out=x[:, :H])
        x[:, H : 2 * H] = self._normed(self._token_rows, embed, token, self.token_norm_w)
        if match_length:
            x[:, 2 * H :] = self._normed(self._successor_rows, embed, successor, self.successor_norm_w)
        else:
            x[:, 2 * H :].zero_()  # the norm of a zero row is zero
        return self._rest(x, self.match_rows[match_length])

    def _normed(self, cache: dict, embed: torch.Tensor, token: int, weight: torch.Tensor) -> torch.Tensor:
        row = cache.get(token)
        if row is None:
            if len(cache) >= _NORMED_CACHE_ROWS:
                cache.clear()
            row = cache[token] = _rms_norm(embed[token].unsqueeze(0), weight, self.eps)  # [1, H]
        return row

    def forward(self, feature: torch.Tensor, token_emb: torch.Tensor, successor_emb: Optional[torch.Tensor],
                match: torch.Tensor) -> torch.Tensor:
        """:meth:`DraftHeadNet.forward` for M rows.

        Args:
            feature, token_emb: ``[M, H]`` float32.
            successor_emb: ``[M, H]`` float32 (zero rows where none), or None: no row has a successor.
            match: ``[M, H]`` (or ``[1, H]`` for M = 1) float32 match embeddings (:attr:`match_rows`).

        Returns:
            ``[M, H]`` float32 predicted features.
        """
        H, eps = self.hidden_size, self.eps
        x = torch.empty(feature.shape[0], 3 * H)  # [M, 3H], the concatenated normalised inputs
        _rms_norm(feature, self.feature_norm_w, eps, out=x[:, :H])
        _rms_norm(token_emb, self.token_norm_w, eps, out=x[:, H : 2 * H])
        if successor_emb is None:
            x[:, 2 * H :].zero_()  # the norm of a zero row is zero
        else:
            _rms_norm(successor_emb, self.successor_norm_w, eps, out=x[:, 2 * H :])
        return self._rest(x, match)

    def _rest(self, x: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
        """From the ``[M, 3H]`` normalised inputs to the ``[M, H]`` predicted features."""
        eps = self.eps
        x = self.fc_in(x).add_(match)  # [M, H]
        for norm_w, gate, up, down, inter in self.blocks:
            h = _rms_norm(x, norm_w, eps)
            if up is None:  # fused [M, 2I]
                gu = gate(h)
                a = nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
            else:
                a = nn.functional.silu(gate(h)) * up(h)
            x = x + down(a)
        return _rms_norm(x, self.out_norm_w, eps)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """``[M, H]`` features -> ``[M, Vd]`` float32 draft-vocabulary logits."""
        return self.lm_head(feature)


# ---------------------------------------------------------------- the speculator
@dataclass
class _RequestState:
    """Per request: the committed tokens seen so far and their n-gram index.

    Invariant: ``index`` holds the n-grams ending at positions ``0 .. len(tokens) - 2``
    (the newest committed token's n-grams are added to the draft chain's overlay).
    """

    tokens: list[int]
    index: ContextIndex
    generator: Optional[torch.Generator] = None  # a seeded request's draft sampler
    noise: dict = field(default_factory=dict)  # output position -> coupled-draft noise (see _noise_cache)
    noise_key: Optional[tuple] = None  # (runtime, seed) the noise is for


class DraftHeadSpeculator(Speculator):
    """Drafts a chain of tokens with a draft head on the target's hidden state.

    Greedy requests get the argmax chain (no ``draft_probs``); sampled requests
    get tokens sampled from the head's distribution, processed with the
    request's temperature / top-k / top-p over the draft vocabulary, and that
    distribution as ``draft_probs`` (zero outside the draft vocabulary).
    ``confidence[i]`` is the head's probability of draft token i.

    Per request it keeps the committed tokens' n-gram index (for the context
    successor), freed by ``stop_request``.

    Draft sampling: a seeded request draws with the noise the engine's coupled
    verifier uses at the same output position
    (:func:`~adaspec.speculators.base.coupled_draft`), so its drafts agree with
    the target's draws as often as the two distributions allow; unseeded
    requests share one generator, seeded once, and each draft is a fresh draw
    from its ``draft_probs``, which rejection sampling needs to be exact (a
    sampler re-seeded by prompt alone would repeat the same drafts for every
    sample).

    Args:
        net: the trained head (float32, eval mode).
        embed_weight: ``[V, H]`` float32, the target's input embeddings.
        seed: seed of the draft sampler. Default 0.
        int8: draft with int8 linears (the weights as :func:`quantize_head`
            quantizes them; the lean core's int8 kernel runs them where it is
            built, else fbgemm); falls back to float32 where fbgemm is
            missing. Default True.
        copy_net: draft with a frozen copy of ``net`` (default), so later edits
            to it never reach drafting; False takes ``net`` itself (frozen in
            place: a caller that owns it saves a copy's memory at start-up).

    Attributes:
        runtime: the :class:`_DraftRuntime` new requests draft with, built by
            :meth:`_prepare`; :meth:`_runtime_for` picks a request's runtime
            (a subclass that swaps heads keeps each request on the runtime it
            started with).
        net: the runtime's float32 head (a frozen copy of ``net``).
        int8: whether the runtime actually drafts in int8.

    Raises:
        ValueError: if ``embed_weight`` does not match the head's shape.
    """

    name = "draft_head"
    needs_hidden_states = True
    provides_draft_probs = True

    def __init__(self, net: DraftHeadNet, embed_weight: torch.Tensor, seed: int = 0, int8: bool = True,
                 copy_net: bool = True) -> None:
        self.embed = embed_weight  # [V, H], shared with the target (not copied)
        self.vocab_size = int(embed_weight.shape[0])
        self.seed = seed
        self._int8_wanted = int8
        self.runtime = self._prepare(net, copy_net)  # the head new requests draft with (see _runtime_for)
        self._requests: dict[str, _RequestState] = {}
        self._generator = torch.Generator().manual_seed(seed)
        # Seeded requests draft with the verifier's noise; False draws them independently
        # (request_draft_generator), which only the acceptance benchmark wants.
        self.couple_seeded = True

    @property
    def net(self) -> DraftHeadNet:
        """The float32 head of :attr:`runtime` (eval mode, no gradients; a copy of the one passed in)."""
        return self.runtime.net

    @property
    def int8(self) -> bool:
        """Whether :attr:`runtime` drafts in int8."""
        return self.runtime.int8

    def _prepare(self, net: DraftHeadNet, copy_net: bool = True) -> _DraftRuntime:
        """Everything drafting needs from ``net``, in one object (see :class:`_DraftRuntime`).

        ``net`` is copied unless ``copy_net`` is False (later edits to it, e.g.
        further training, never reach the runtime), frozen, and quantized when
        the speculator drafts in int8.

        Raises:
            ValueError: if the target embeddings do not match the head's shape.
        """
        cfg = net.config
        if tuple(self.embed.shape) != (cfg.target_vocab_size, cfg.hidden_size):
            raise ValueError(
                f"target embeddings have shape {tuple(self.embed.shape)}; the draft head was built for "
                f"vocabulary {cfg.target_vocab_size} x hidden {cfg.hidden_size}"
            )
        net = (copy.deepcopy(net) if copy_net else net).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return _DraftRuntime(net, self._int8_wanted)

    def _runtime_for(self, ctx: ProposeContext) -> _DraftRuntime:
        """The runtime that drafts for ``ctx``'s request: here always :attr:`runtime`."""
        return self.runtime

    # ---------------------------------------------------------------- lifecycle
    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        self._requests[request_id] = self._new_state()

    def stop_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def _new_state(self) -> _RequestState:
        return _RequestState(tokens=[], index=ContextIndex(self.net.config.context_ngram))

    def _sync(self, ctx: ProposeContext) -> _RequestState:
        """The request's state with every committed token indexed (see :class:`_RequestState`)."""
        st = self._requests.get(ctx.request_id)
        if st is None:  # a caller that skipped start_request
            st = self._requests[ctx.request_id] = self._new_state()
        toks = ctx.token_ids
        n_old = len(st.tokens)
        if len(toks) < n_old or (n_old and toks[n_old - 1] != st.tokens[-1]):
            # Committed tokens only ever grow; anything else is a new context: rebuild.
            st.tokens, st.index, n_old = [], ContextIndex(self.net.config.context_ngram), 0
        st.tokens.extend(int(t) for t in toks[n_old:])
        for p in range(max(0, n_old - 1), len(st.tokens) - 1):
            st.index.add(st.tokens, p)
        return st

    # ---------------------------------------------------------------- drafting
    def _sampler(self, st: _RequestState, ctx: ProposeContext) -> torch.Generator:
        return draft_sampler(st, ctx, self._generator)

    def _noise_cache(self, st: _RequestState, rt: _DraftRuntime, ctx: ProposeContext) -> Optional[dict]:
        """The request's coupled-draft noise per output position (:func:`coupled_draft`'s cache), or None.

        Kept for one runtime (its draft vocabulary) and seed; positions before
        the next output position are dropped (never drafted again).
        """
        if ctx.greedy or ctx.seed is None or not self.couple_seeded:
            return None
        if st.noise_key is None or st.noise_key[0] is not rt or st.noise_key[1] != ctx.seed:
            st.noise, st.noise_key = {}, (rt, ctx.seed)
        first = len(ctx.token_ids) - ctx.num_prompt_tokens
        for position in [p for p in st.noise if p < first]:
            del st.noise[position]
        return st.noise

    @torch.inference_mode()
    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        """Draft up to ``max_draft_tokens`` tokens; nothing when ``ctx.hidden_state`` is None."""
        if ctx.hidden_state is None or max_draft_tokens <= 0 or not ctx.token_ids:
            return DraftProposal(speculator=self.name)
        rt = self._runtime_for(ctx)
        st = self._sync(ctx)
        sampler = None if ctx.greedy else self._sampler(st, ctx)
        noise = self._noise_cache(st, rt, ctx)
        seq = list(st.tokens)  # committed tokens, then the chain
        overlay = ContextIndex(rt.config.context_ngram)  # n-grams ending at the newest token or later
        feature = ctx.hidden_state.float().reshape(1, -1)  # [1, H]
        embed, d2t = self.embed, rt.draft_to_target_list
        ids: list[int] = []
        conf: list[float] = []
        rows: list[torch.Tensor] = []  # [Vd] each, sampled requests only
        for _ in range(max_draft_tokens):
            t = len(seq) - 1
            succ, n = st.index.successor(seq, t, overlay)
            feature = rt.step(feature, embed, seq[t], succ, n)  # [1, H]
            logits = rt.logits(feature)[0]  # [Vd]
            if sampler is None:  # greedy: draft_token's argmax, without its call
                j = int(logits.numpy().argmax())  # torch.argmax's answer (the first maximum), cheaper at this size
                c = float(torch.softmax(logits, dim=-1)[j])
            else:
                j, c, row = draft_token(logits, ctx, sampler, step=len(ids),
                                        vocab_size=self.vocab_size if self.couple_seeded else None,
                                        vocab_ids=rt.draft_to_target, noise_cache=noise)
                rows.append(row)
            token = d2t[j]
            ids.append(token)
            conf.append(c)
            overlay.add(seq, t)
            seq.append(token)
        draft_probs = draft_probs_matrix(rows, self.vocab_size, rt.draft_to_target)
        return DraftProposal(token_ids=ids, draft_probs=draft_probs, confidence=conf, speculator=self.name)

    @torch.inference_mode()
    def propose_tree(self, ctx: ProposeContext, max_depth: int, width: int = 3) -> TokenTree:
        """A dynamic draft tree (EAGLE-2, Li et al. 2024, arXiv 2406.16858): expand by cumulative probability.

        Depth by depth: the ``width`` frontier nodes with the highest cumulative
        draft probability (the product of the head's probabilities along the
        path) are expanded in one batched head forward, each with its ``width``
        most probable tokens; the ``width`` best of those form the next
        frontier. Every expanded candidate is a node (the controller reranks
        and prunes them by value, EAGLE-2's second phase).

        Candidates are deterministic (a point mass each, no ``draft_probs``):
        the top tokens of the head's distribution, processed with the request's
        sampling parameters when it samples. For a seeded sampled request the
        first candidate of each expanded node is the coupled draw
        (:func:`~adaspec.speculators.base.coupled_draft`), which the coupled
        verifier accepts most often.

        Returns:
            a :class:`TokenTree` (claims ``source="draft_head"``, ``confidence``
            = the head's probability of the token given its parent; ``value`` =
            cumulative probability); empty when ``ctx.hidden_state`` is None.
        """
        tree = TokenTree()
        if ctx.hidden_state is None or max_depth <= 0 or width <= 0 or not ctx.token_ids:
            return tree
        rt = self._runtime_for(ctx)
        st = self._sync(ctx)
        cfg = rt.config
        # frontier entries: (cumulative prob, node, sequence, overlay, feature [H])
        frontier = [(1.0, -1, list(st.tokens), ContextIndex(cfg.context_ngram), ctx.hidden_state.float())]
        for depth in range(max_depth):
            feats, toks, succs, matches = [], [], [], []
            for _, _, seq, overlay, feat in frontier:
                t = len(seq) - 1
                succ, n = st.index.successor(seq, t, overlay)
                feats.append(feat.reshape(-1))
                toks.append(seq[t])
                succs.append(succ if n else -1)
                matches.append(n)
            match_t = torch.tensor(matches, dtype=torch.long)
            succ_emb = successor_inputs(self.embed, torch.tensor(succs, dtype=torch.long), match_t)  # [F, H]
            match = rt.net.match_embed.weight[match_t]  # [F, H]
            out = rt.forward(torch.stack(feats), self.embed[torch.tensor(toks)], succ_emb, match)  # [F, H]
            logits = rt.logits(out)  # [F, Vd]
            if ctx.greedy:
                probs = torch.softmax(logits.float(), dim=-1)
            else:
                probs = process_logits(logits.float(), ctx.temperature, ctx.top_k, ctx.top_p)
            top_p, top_j = torch.topk(probs, min(width, probs.shape[-1]), dim=-1)  # [F, w]
            candidates = []
            for f, (cum, node, seq, overlay, _) in enumerate(frontier):
                picks = list(zip(top_j[f].tolist(), top_p[f].tolist()))
                if ctx.seed is not None and not ctx.greedy and self.couple_seeded:
                    j = coupled_draft(probs[f], ctx, depth, self.vocab_size, rt.draft_to_target,
                                      self._noise_cache(st, rt, ctx))
                    picks = [(j, float(probs[f, j]))] + [pj for pj in picks if pj[0] != j][: width - 1]
                for j, pr in picks:
                    if pr <= 0.0:
                        continue
                    token = rt.draft_to_target_list[j]
                    c = cum * pr
                    child = tree.add(node, token, TreeClaim(self.name, None, float(pr)), c)
                    candidates.append((c, child, seq, overlay, out[f], token))
            candidates.sort(key=lambda x: -x[0])
            frontier = []
            for c, child, seq, overlay, feat, token in candidates[:width]:
                ov = ContextIndex(cfg.context_ngram)
                ov.last = [dict(d) for d in overlay.last]
                ov.add(seq, len(seq) - 1)
                frontier.append((c, child, seq + [token], ov, feat))
            if not frontier:
                break
        return tree


def check_matches_target(net: DraftHeadNet, target: Any) -> None:
    """Refuse a head trained for another target.

    Raises:
        ValueError: vocabulary size, hidden size, or the LM-head rows differ.
    """
    cfg = net.config
    V = int(target.vocab_size)
    emb = target_embedding_weight(target)
    if cfg.target_vocab_size != V or cfg.hidden_size != int(emb.shape[1]):
        raise ValueError(
            f"draft head was trained for vocabulary {cfg.target_vocab_size} x hidden {cfg.hidden_size} "
            f"({cfg.target_name or 'unknown target'}); target {target.name} has {V} x {int(emb.shape[1])}"
        )
    # every 8th draft row: a head made for another target differs on all of them, and the
    # check stays cheap at every start (a fraction of the rows, of their time and memory)
    sample = torch.arange(0, len(net.draft_to_target), _LM_HEAD_CHECK_STRIDE)
    rows = target_lm_head_weight(target, net.draft_to_target[sample])  # [ceil(Vd / 8), H]
    if rows is not None:
        scale = float(rows.abs().max()) or 1.0
        err = float((rows - net.lm_head[sample]).abs().max()) / scale
        if err > _LM_HEAD_MATCH_TOLERANCE:
            raise ValueError(
                f"draft head was trained for {cfg.target_name or 'another target'}: its LM-head rows differ from "
                f"{target.name}'s (max relative difference {err:.3g})"
            )


def load_static_speculator(target: Any, path: Optional[str | Path] = None, seed: int = 0,
                           int8: bool = True) -> DraftHeadSpeculator:
    """The draft-head speculator for a loaded target.

    Args:
        target: a loaded target model (``adaspec.target.TargetModel``).
        path: a checkpoint file; default: the one shipped in the package for
            ``target.name`` (``adaspec/data/draft_head-<name>.safetensors``).
        seed: seed of the draft sampler.
        int8: draft with the int8 copy of the head (see :class:`DraftHeadSpeculator`).

    Raises:
        FileNotFoundError: no checkpoint for this target.
        ValueError: the checkpoint was trained for a different target.
    """
    path = Path(path) if path is not None else shipped_checkpoint_path(str(target.name))
    net, _ = load_draft_head(path)
    check_matches_target(net, target)
    return DraftHeadSpeculator(net, target_embedding_weight(target).float(), seed=seed, int8=int8, copy_net=False)
