"""The lean decoder: a llama-family forward in one C++ call, batch-invariant by construction.

Built *from* a transformers model (:func:`LeanDecoder.from_hf`): after
:func:`adaspec.quant.quantize_target` it takes each :class:`~adaspec.quant.Int8Linear`'s
int8 weights, per-channel scales, bias and SmoothQuant factors, the (smoothed)
norm weights, the fp32 embedding and the rotary frequencies, so calibration,
smoothing and weights are exactly today's int8 path; an fp32 model gives an fp32
lean decoder (same kernels, fp32 GEMM).

Supported: ``model_type`` llama, qwen2 (q/k/v biases), mistral without a sliding
window; SiLU MLP; RMSNorm; RoPE default or llama3 scaling (whatever the HF
rotary module computed). :func:`unsupported_reason` says why another model is not.

Invariance contract (tests/test_lean.py): a fed token's logits, hidden state
and KV entries are bitwise identical whatever the number of tokens fed with it,
how its prefix was chunked, which other requests share the forward, and the
tree around it (it sees its request's cached prefix and its ancestors among the
fed tokens, nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from adaspec.model.kv import BlockPool, LeanKVCache, kv_dtype_for

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
# Longest chain one kernel call gets; longer prefills are split (bitwise the same result).
PREFILL_CHUNK = 256


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the lean decoder cannot run ``model`` (None if it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model"
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        return f"model_type {mt!r} is not one of {SUPPORTED_TYPES}"
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} is not silu"
    if getattr(config, "use_sliding_window", False) or (mt == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention is not supported"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rtype = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rtype not in ("default", "llama3", "linear"):
        return f"rope type {rtype!r} is not supported (position-dependent rescaling)"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 8 or config.hidden_size % 8 or config.intermediate_size % 8:
        return "hidden, intermediate and head sizes must be multiples of 8"
    return None


@dataclass
class BatchRequest:
    """One request's part of a :meth:`LeanDecoder.forward_batch` call.

    Attributes:
        cache: its KV cache; fed token i goes to slot ``cache.length + i``.
        token_ids: the T >= 1 fed tokens.
        parents: optional tree: ``parents[i]`` is the fed index of token i's parent
            (-1: its parent is the last cached token); token i sits at position
            ``cache.length + depth(i)`` and sees the prefix and its ancestors.
            Parents must come before children. None = a chain (i's parent is i - 1).
        mask: alternatively a ``[T, T]`` bool mask (row i: the fed tokens i sees,
            including itself); positions are ``cache.length + mask[i].sum() - 1``.
        last_only: logits for the last fed token only.
    """

    cache: LeanKVCache
    token_ids: Sequence[int]
    parents: Optional[Sequence[int]] = None
    mask: Optional[torch.Tensor] = None
    last_only: bool = False


def _visibility(T: int, parents: Optional[Sequence[int]], mask: Optional[torch.Tensor]) -> tuple[list[list[int]], list[int]]:
    """Per fed token: the fed indices it sees (increasing, ending with itself) and its depth."""
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (T, T):
            raise ValueError(f"mask must be [{T}, {T}], got {tuple(mask.shape)}")
        vis = []
        for i in range(T):
            row = mask[i].nonzero().flatten().tolist()
            if not row or row[-1] != i:
                raise ValueError(f"mask row {i} must see itself and nothing after it")
            vis.append(row)
        return vis, [len(v) - 1 for v in vis]
    if parents is None:
        return [list(range(i + 1)) for i in range(T)], list(range(T))
    if len(parents) != T:
        raise ValueError(f"parents has {len(parents)} entries for {T} tokens")
    vis, depth = [], []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parent of fed token {i} must be in [-1, {i}), got {p}")
        vis.append((vis[p] if p >= 0 else []) + [i])
        depth.append(len(vis[-1]) - 1)
    return vis, depth


class LeanDecoder:
    """A llama-family decoder whose whole forward runs in the lean C++ kernel.

    Attributes:
        num_layers, hidden_size, num_heads, num_kv_heads, head_dim, vocab_size.
        dtype: "int8" (quantized linears) or "float32".
        pool: the :class:`BlockPool` every cache of this decoder uses.
    """

    def __init__(self, kernel_model, *, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, vocab_size: int, max_positions: int, dtype: str, pool: BlockPool):
        self._km = kernel_model
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.dtype = dtype
        self.pool = pool
        self.weights_version = 0  # +1 per swap_weights

    # ------------------------------------------------------------------ building

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: nn.Module, max_positions: int, pool_tokens: Optional[int] = None,
                block_size: int = 64) -> "LeanDecoder":
        """Build from a transformers llama/qwen2 model, fp32 or after :func:`adaspec.quant.quantize_model_int8`.

        Args:
            model: the ``*ForCausalLM`` module (not modified; int8 weights are copied, and an
                :class:`adaspec.quant.Int8Linear` loaded from the int8 cache drops its own
                copy until something reads it: ``Int8Linear.release_int8``).
            max_positions: RoPE table length (the context window).
            pool_tokens: KV pool capacity in positions over all requests
                (default ``8 * max_positions``; virtual memory until used).
            block_size: positions per KV block.

        Raises:
            ValueError: :func:`unsupported_reason` is not None, or a layer is of an unknown kind.
            RuntimeError: the kernel does not build.
        """
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"lean decoder: {reason}")
        from adaspec.model.build import lean_kernel

        ext = lean_kernel()
        config = model.config
        inner = model.model
        H = config.hidden_size
        Hq = config.num_attention_heads
        Hkv = getattr(config, "num_key_value_heads", None) or Hq
        D = getattr(config, "head_dim", None) or H // Hq
        I = config.intermediate_size
        eps = float(inner.norm.variance_epsilon if hasattr(inner.norm, "variance_epsilon") else config.rms_norm_eps)
        rot = inner.rotary_emb
        pos = torch.arange(max_positions, dtype=torch.int64)
        freqs = pos[:, None].float() * rot.inv_freq.float()[None, :]  # [P, D/2], as HF's rotary forward
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        cos, sin = (emb.cos() * scaling).contiguous(), (emb.sin() * scaling).contiguous()
        embed = inner.embed_tokens.weight.detach().float().contiguous()
        km = ext.LeanModel(H, Hq, Hkv, D, I, eps, block_size, cos, sin, embed)
        kinds = set()
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _linear(ext, [attn.q_proj, attn.k_proj, attn.v_proj], kinds)
            o = _linear(ext, [attn.o_proj], kinds)
            gate_up = _linear(ext, [mlp.gate_proj, mlp.up_proj], kinds)
            down = _linear(ext, [mlp.down_proj], kinds)
            km.add_layer(layer.input_layernorm.weight.detach().float(), qkv, o,
                         layer.post_attention_layernorm.weight.detach().float(), gate_up, down)
        km.set_head(inner.norm.weight.detach().float(), _linear(ext, [model.lm_head], kinds))
        if len(kinds) != 1:
            raise ValueError(f"mixed linear kinds {kinds}: quantize all layers or none")
        from adaspec.quant import Int8Linear

        for mod in model.modules():  # the kernel holds its own copy; a cached int8 model reads it back on demand
            if isinstance(mod, Int8Linear):
                mod.release_int8()
        _trim_heap()
        dtype = kinds.pop()
        pool_tokens = pool_tokens or 8 * max_positions
        pool = BlockPool(len(inner.layers), Hkv, D, -(-pool_tokens // block_size), block_size, kv_dtype_for(dtype))
        return cls(km, num_layers=len(inner.layers), hidden_size=H, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                   vocab_size=int(embed.shape[0] if model.lm_head is None else _out_features(model.lm_head)),
                   max_positions=max_positions, dtype=dtype, pool=pool)

    # ------------------------------------------------------------------ caches

    def new_cache(self) -> LeanKVCache:
        """An empty cache pinned to the current weights (see :meth:`swap_weights`)."""
        return LeanKVCache(pool=self.pool, weights=self._km, weights_version=self.weights_version)

    def _weights_of(self, cache: LeanKVCache):
        return self._km if cache.weights is None else cache.weights

    # ------------------------------------------------------------------ new weights

    def prepare_weights(self, model: nn.Module):
        """The kernel's copy of ``model``'s weights (same architecture, quantized alike), not yet served.

        Raises:
            ValueError: ``model`` has another shape or quantization than the served one.
        """
        block = self.pool.block_size
        other = LeanDecoder.from_hf(model, self.max_positions, pool_tokens=block, block_size=block)
        shape = (other.num_layers, other.hidden_size, other.num_heads, other.num_kv_heads, other.head_dim,
                 other.vocab_size)
        served = (self.num_layers, self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                  self.vocab_size)
        if shape != served:
            raise ValueError(f"new weights have (layers, hidden, heads, kv heads, head dim, vocab) {shape}; the "
                             f"served model has {served}")
        if other.dtype != self.dtype:
            raise ValueError(f"new weights are {other.dtype}; the served model is {self.dtype}")
        return other._km

    def swap_weights(self, prepared) -> int:
        """Serve :meth:`prepare_weights`' result from now on; returns the new weights version.

        Caches created from now on (:meth:`new_cache`) run on the new weights;
        a cache created before keeps the weights it was created with until it is
        dropped, so no request runs on a mix of old and new weights (its KV
        entries were computed by the old ones). The KV pool is kept.
        """
        self._km = prepared
        self.weights_version += 1
        return self.weights_version

    def load_weights(self, model: nn.Module) -> int:
        """:meth:`prepare_weights` then :meth:`swap_weights`."""
        return self.swap_weights(self.prepare_weights(model))

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def forward_batch(self, requests: Sequence[BatchRequest], logits: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward over several requests' fed tokens, flattened into one batch.

        Each request's fed tokens are written to its cache at slots
        ``length .. length + T - 1`` and its length grows by T (for a tree, keep
        the accepted path with :meth:`keep_path`, then truncate).

        Args:
            requests: one :class:`BatchRequest` each (distinct caches).
            logits: compute the LM head (False: hidden states only).

        Returns:
            per request ``(logits [T or 1, V] float32, hidden [T or 1, H] float32)``.

        Raises:
            ValueError: empty token list, bad tree, positions past the context window.
            PoolExhausted: the KV pool is full.
        """
        if not requests:
            return []
        if len({id(r.cache) for r in requests}) != len(requests):
            raise ValueError("each request of a batch needs its own cache")
        kms = {id(self._weights_of(r.cache)): self._weights_of(r.cache) for r in requests}
        if len(kms) > 1:  # caches pinned to different weights versions: one forward per version
            return self._forward_by_weights(requests, logits)
        ids, positions, rows, prefix, vis_ptr, vis_idx, logit_rows = [], [], [0], [], [0], [], []
        for r in requests:
            T = len(r.token_ids)
            if T == 0:
                raise ValueError("forward needs at least one token per request")
            vis, depth = _visibility(T, r.parents, r.mask)
            P = r.cache.length
            if P + T > self.max_positions:
                raise ValueError(f"positions up to {P + T} exceed the context window {self.max_positions}")
            r.cache.reserve(P + T)
            base = rows[-1]
            ids.extend(int(t) for t in r.token_ids)
            positions.extend(P + d for d in depth)
            for v in vis:
                vis_idx.extend(v)
                vis_ptr.append(len(vis_idx))
            rows.append(base + T)
            prefix.append(P)
            logit_rows.extend([base + T - 1] if r.last_only else range(base, base + T))
        nbmax = max(len(r.cache.blocks) for r in requests)
        table = torch.zeros(len(requests), nbmax, dtype=torch.int64)
        for q, r in enumerate(requests):
            table[q, :len(r.cache.blocks)] = torch.tensor(r.cache.blocks, dtype=torch.int64)
        t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        km = next(iter(kms.values()))
        out_logits, hidden = km.forward(t(ids), t(positions), t(rows), t(prefix), table, t(vis_ptr), t(vis_idx),
                                        self.pool.keys, self.pool.values, t(logit_rows), logits)
        results, at = [], 0
        for r in requests:
            n = 1 if r.last_only else len(r.token_ids)
            results.append((out_logits[at:at + n], hidden[at:at + n]))
            r.cache.length += len(r.token_ids)
            at += n
        return results

    def _forward_by_weights(self, requests: Sequence[BatchRequest],
                            logits: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward_batch` split by the weights each cache is pinned to (results in request order)."""
        groups: dict[int, list[int]] = {}
        for q, r in enumerate(requests):
            groups.setdefault(id(self._weights_of(r.cache)), []).append(q)
        results: list = [None] * len(requests)
        for members in groups.values():
            for q, res in zip(members, self.forward_batch([requests[q] for q in members], logits)):
                results[q] = res
        return results

    def forward(self, cache: LeanKVCache, token_ids: Sequence[int], last_only: bool = False,
                parents: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_batch` for one request: ``(logits [T, V], hidden [T, H])``.

        A long chain (prefill) runs in forwards of :data:`PREFILL_CHUNK` tokens:
        the result is bitwise the same (invariance), the attention scratch stays small.
        """
        T = len(token_ids)
        if parents is not None or T <= PREFILL_CHUNK:
            return self.forward_batch([BatchRequest(cache, token_ids, parents=parents, last_only=last_only)])[0]
        if cache.length + T > self.max_positions:
            raise ValueError(f"positions up to {cache.length + T} exceed the context window {self.max_positions}")
        logits, hidden = [], []
        for start in range(0, T, PREFILL_CHUNK):
            part = token_ids[start:start + PREFILL_CHUNK]
            final = start + PREFILL_CHUNK >= T
            # with last_only, earlier chunks need no LM head
            lg, h = self.forward_batch([BatchRequest(cache, part, last_only=last_only)],
                                       logits=final or not last_only)[0]
            logits.append(lg)
            hidden.append(h)
        if last_only:
            return logits[-1], hidden[-1]
        return torch.cat(logits), torch.cat(hidden)

    @torch.no_grad()
    def keep_path(self, cache: LeanKVCache, start: int, fed_indices: Sequence[int]) -> None:
        """After a tree forward: move the KV of fed tokens ``fed_indices`` (a root-to-leaf path,
        fed at slot ``start``) to slots ``start, start + 1, ...`` and truncate after them."""
        B = self.pool.block_size
        src = [start + i for i in fed_indices]
        dst = list(range(start, start + len(src)))
        if src != dst:
            def split(slots):
                blk = torch.tensor([cache.blocks[s // B] for s in slots])
                off = torch.tensor([s % B for s in slots])
                return blk, off
            bs, os_ = split(src)
            bd, od = split(dst)
            k, v = self.pool.keys, self.pool.values
            k_rows = k[:, bs, :, os_ // 8, :, os_ % 8].clone()
            v_rows = v[:, bs, :, os_].clone()
            k[:, bd, :, od // 8, :, od % 8] = k_rows
            v[:, bd, :, od] = v_rows
        cache.truncate(start + len(src))

    def weight_bytes(self) -> int:
        """Bytes of weights one forward reads: every linear layer once (int8: 1 byte per weight plus
        4 per output channel's scale; float32: 4 per weight)."""
        return int(self._km.weight_bytes())

    def kv_bytes(self, positions: int) -> int:
        """Bytes of K and V (the pool's dtype) that attention over ``positions`` cached positions reads."""
        return positions * self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.pool.keys.element_size()

    def matmuls_only(self, rows: int) -> None:
        """Run every linear layer once over ``rows`` rows (the matmul floor of a forward)."""
        self._km.matmuls_only(rows)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed chunks of a few MB mapped)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _out_features(lin: nn.Module) -> int:
    return int(getattr(lin, "out_features", None) or lin.weight.shape[0])


def _int8_parts(mod: nn.Module):
    """``(Int8Linear, row slice)`` behind an Int8Linear or a FusedInt8Member, else None."""
    from adaspec.quant import FusedInt8Member, Int8Linear

    if isinstance(mod, Int8Linear):
        return mod, slice(0, mod.out_features)
    if isinstance(mod, FusedInt8Member):
        group = mod.group if "group" in mod._modules else mod._group_ref[0]
        return group.linear, slice(group.bounds[mod.index], group.bounds[mod.index + 1])
    return None


def stack_int8_linear(ext, blocks: Sequence[tuple]):
    """One kernel int8 Linear from row blocks stacked along the output dimension (they share an input).

    Each block keeps its own int8 rows, per-row scales and bias, so the result equals the
    separate layers bitwise; a block without a bias gets zeros where another has one.

    Args:
        blocks: ``(w, w_scale, bias, inv_smooth, activation_bits)`` per block: ``[n, K]`` int8,
            ``[n]`` float32, ``[n]`` float32 or None, ``[K]`` float32 or None, 7 or 8.

    Raises:
        ValueError: the blocks differ in activation bits or input smoothing.
    """
    if len({b[4] for b in blocks}) != 1:
        raise ValueError("stacked layers must share activation bits")
    smooth = blocks[0][3]
    for b in blocks[1:]:
        if (b[3] is None) != (smooth is None) or (smooth is not None and not torch.equal(b[3], smooth)):
            raise ValueError("stacked layers must share their input smoothing")
    w = blocks[0][0] if len(blocks) == 1 else torch.cat([b[0] for b in blocks])  # (cat copies even one tensor)
    scale = torch.cat([b[1] for b in blocks])
    bias = None
    if any(b[2] is not None for b in blocks):
        bias = torch.cat([b[2] if b[2] is not None else torch.zeros(b[0].shape[0]) for b in blocks])
    return ext.make_linear(w.contiguous(), scale.float().contiguous(), bias,
                           None if smooth is None else smooth.detach().float(), blocks[0][4])


def _linear(ext, mods: Sequence[nn.Module], kinds: set):
    """One kernel Linear for ``mods`` stacked along the output dimension (they share an input).

    int8 members are stacked row by row (each output row keeps its own int8 weights,
    scale and bias, so the result equals the separate layers bitwise); they must
    share the activation bits and the input smoothing.
    """
    parts = [_int8_parts(m) for m in mods]
    if all(p is not None for p in parts):
        kinds.add("int8")
        lins = [p[0] for p in parts]
        made = stack_int8_linear(ext, [(lin._w_int8[sl], lin.w_scale[sl], None if lin.bias is None else lin.bias.detach()[sl],
                                        lin.inv_smooth, lin.activation_bits) for lin, sl in parts])
        for lin in lins:  # layer by layer, so two copies of every weight never coexist
            lin.release_int8()
        return made
    if any(p is not None for p in parts) or not all(isinstance(m, nn.Linear) for m in mods):
        raise ValueError(f"unsupported linear layers {[type(m).__name__ for m in mods]}")
    kinds.add("float32")
    # a single layer shares the module's weight storage (in-place edits stay visible)
    w = mods[0].weight.detach() if len(mods) == 1 else torch.cat([m.weight.detach().float() for m in mods])
    w = w.float().contiguous()
    has_bias = any(m.bias is not None for m in mods)
    bias = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                      for m in mods]) if has_bias else None
    return ext.make_linear(w, torch.ones(w.shape[0]), bias, None, 8)
