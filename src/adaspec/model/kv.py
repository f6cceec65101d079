"""A position-indexed, block-allocated KV cache for the lean decoder (gpt-fast / vLLM style).

One :class:`BlockPool` per model holds every request's keys and values in fixed
blocks of ``block_size`` positions; a request's :class:`LeanKVCache` is a list of
block ids plus a length. Slot ``i`` of a request holds position ``i`` of its
committed sequence, so rollback after a rejection is a length change
(:meth:`LeanKVCache.truncate`), and blocks past the new length go back to the pool.

Layouts (L layers, NB blocks, Hkv kv heads, B = block_size, D = head dim):

- keys ``[L, NB, Hkv, B / 8, D, 8]``: 8 consecutive positions side by side per
  d, so the attention kernel scores 8 keys with one vector FMA chain;
- values ``[L, NB, Hkv, B, D]``.

Entries are float16 for an int8 model (llama.cpp's default K/V type: half the bytes
one-token decoding reads at long context, twice the positions per GiB) and float32
for a float32 one (the reference path); ``ADASPEC_KV_DTYPE`` = ``float16`` /
``float32`` overrides (:func:`kv_dtype_for`). A float16 entry is rounded once, when
written, and read back exactly, so invariance holds as with float32.

The pool is allocated once with ``torch.empty`` (virtual memory: pages are
committed when first written), so a large ``num_blocks`` costs only what
requests actually use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_KV_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def kv_dtype_for(weights_dtype: str) -> torch.dtype:
    """The K/V pool dtype for a decoder whose linear layers are ``weights_dtype`` (``"int8"`` or
    ``"float32"``): ``ADASPEC_KV_DTYPE`` if set (``float16``, ``float32`` or ``auto``), else float16
    for int8 weights and float32 for float32 ones.

    Raises:
        ValueError: ``ADASPEC_KV_DTYPE`` is set to something else.
    """
    import os

    name = os.environ.get("ADASPEC_KV_DTYPE", "auto").strip().lower() or "auto"
    if name == "auto":
        return torch.float16 if weights_dtype == "int8" else torch.float32
    if name not in _KV_DTYPES:
        raise ValueError(f"ADASPEC_KV_DTYPE must be one of auto, float16, float32; got {name!r}")
    return _KV_DTYPES[name]


class PoolExhausted(RuntimeError):
    """No free block left in the :class:`BlockPool`."""


class BlockPool:
    """Fixed-size KV blocks shared by all requests of one model.

    Attributes:
        keys, values: the pool tensors (layouts in the module docstring).
        block_size: positions per block (a multiple of 8).
        num_blocks: blocks in the pool.
        dtype: ``torch.float32`` or ``torch.float16``, the entries' type.

    Raises:
        ValueError: ``block_size`` is not a multiple of 8, or ``dtype`` is neither.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32):
        if block_size % 8:
            raise ValueError(f"block_size must be a multiple of 8, got {block_size}")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"KV pool dtype must be torch.float32 or torch.float16, got {dtype}")
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.keys = torch.empty(num_layers, num_blocks, num_kv_heads, block_size // 8, head_dim, 8, dtype=dtype)
        self.values = torch.empty(num_layers, num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhausted(f"all {self.num_blocks} KV blocks ({self.block_size} positions each) are in use")
        return self._free.pop()

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class LeanKVCache:
    """One request's KV cache: ``length`` committed positions in ``blocks``.

    Blocks are returned to the pool when the cache is truncated below them or
    garbage collected (:meth:`release` does it explicitly).
    """

    pool: BlockPool
    length: int = 0
    blocks: list[int] = field(default_factory=list)
    # The decoder weights this cache's entries were computed with (LeanDecoder.swap_weights
    # swaps the current ones; a cache keeps its own until dropped). None: the decoder's current.
    weights: Any = field(default=None, repr=False, compare=False)
    weights_version: int = 0

    def copy(self) -> "LeanKVCache":
        """A new cache with its own blocks holding a copy of positions ``[0, length)``, same weights.

        Raises:
            PoolExhausted: not enough free blocks (nothing is allocated then).
        """
        other = LeanKVCache(pool=self.pool, weights=self.weights, weights_version=self.weights_version)
        other.reserve(self.length)
        n = -(-self.length // self.pool.block_size)
        if n:
            src = torch.tensor(self.blocks[:n], dtype=torch.int64)
            dst = torch.tensor(other.blocks[:n], dtype=torch.int64)
            self.pool.keys[:, dst] = self.pool.keys[:, src]  # whole blocks: slots past length are never read
            self.pool.values[:, dst] = self.pool.values[:, src]
        other.length = self.length
        return other

    def reserve(self, length: int) -> None:
        """Make sure slots ``[0, length)`` have blocks.

        Raises:
            PoolExhausted: not enough free blocks (nothing is allocated then).
        """
        need = -(-length // self.pool.block_size) - len(self.blocks)
        if need > self.pool.free_blocks:
            raise PoolExhausted(f"need {need} more KV blocks, {self.pool.free_blocks} free")
        for _ in range(max(0, need)):
            self.blocks.append(self.pool.allocate())

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions; free the blocks past them."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
        keep = -(-length // self.pool.block_size)
        if keep < len(self.blocks):
            self.pool.release(self.blocks[keep:])
            del self.blocks[keep:]

    def release(self) -> None:
        """Give every block back (the cache is empty afterwards)."""
        self.pool.release(self.blocks)
        self.blocks = []
        self.length = 0

    def __del__(self):
        try:
            if self.blocks:
                self.pool.release(self.blocks)
                self.blocks = []
        except Exception:
            pass


def _seq_length(self: LeanKVCache) -> int:
    """``DynamicCache.get_seq_length`` compatibility: positions held (the length *is* the cache here)."""
    return self.length


LeanKVCache.get_seq_length = _seq_length
LeanKVCache.cache = property(lambda self: self)  # TargetModel's KVCache.cache, for code that inspects it
