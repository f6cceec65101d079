"""Prefix reuse: a radix tree over committed token sequences -> their cached KV (SGLang's RadixAttention idea).

A new request looks up the longest cached prefix of its prompt (its tenant's,
by default), copies that prefix's KV into its own cache and prefills only the
rest. This is exact on the lean core: a token's KV entries are bitwise the same
however its prefix was chunked (``tests/test_lean.py``), so a hit's KV equals
what prefilling would write.

Entries are whole sequences (a prompt after its prefill, or a finished
request's prompt + output, whose cache it takes over without a copy); an entry
holds its own KV blocks from the target's pool, so a copy on a hit is the only
cost. The tree keeps, per tenant:

- nodes with token edges (a radix tree); an entry ends at a node;
- lookup walks the tree as far as the prompt matches; any entry below that
  point holds the matched tokens' KV (an entry's KV covers every prefix of it);
- inserting a sequence that extends an entry replaces it; one that an entry
  already covers is not stored again.

Memory: ``max_tokens`` bounds the positions held by all entries (counted in
whole KV blocks); the least recently used entries are evicted first. Entries
are copied from, never shared, so no entry is ever referenced by a running
request and every entry may be evicted.

Cached prefixes are per tenant unless ``shared=True`` (a shared prefix cache is
a timing side channel between tenants).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

SHARED_TENANT = "*"  # the key all tenants use when the cache is shared


@dataclass
class _Entry:
    tenant: str
    tokens: tuple[int, ...]
    kv: Any  # a LeanKVCache holding exactly len(tokens) positions
    node: "_Node"
    used: int = 0  # LRU clock


@dataclass
class _Node:
    edge: tuple[int, ...] = ()
    parent: Optional["_Node"] = None
    children: dict[int, "_Node"] = field(default_factory=dict)
    entry: Optional[_Entry] = None


@dataclass
class PrefixCacheStats:
    """Counters since start: lookups, hits, prompt tokens looked up and reused, entries evicted."""

    lookups: int = 0
    hits: int = 0
    lookup_tokens: int = 0
    tokens_saved: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def saved_fraction(self) -> float:
        """Reused tokens / prompt tokens that could have been reused."""
        return self.tokens_saved / self.lookup_tokens if self.lookup_tokens else 0.0


class PrefixCache:
    """Cached KV of committed prefixes, per tenant, with LRU eviction under a token bound.

    Args:
        target: a lean-core target (``new_cache()`` returns a
            :class:`adaspec.model.kv.LeanKVCache` on its block pool).
        max_tokens: most positions all entries hold together (whole blocks), > 0.
        shared: one tree for every tenant (opt-in; per tenant by default).
        min_tokens: shortest prefix worth caching or reusing. Default 16.

    Raises:
        ValueError: ``max_tokens < 1``, or a target whose caches are not block caches.
    """

    def __init__(self, target: Any, max_tokens: int, shared: bool = False, min_tokens: int = 16) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        probe = target.new_cache()
        if not hasattr(probe, "pool") or not hasattr(probe, "blocks"):
            raise ValueError("the prefix cache needs the lean runtime's block KV cache")
        self.target = target
        self.pool = probe.pool
        self.max_tokens = int(max_tokens)
        self.shared = shared
        self.min_tokens = max(1, int(min_tokens))
        self._roots: dict[str, _Node] = {}
        self._entries: list[_Entry] = []
        self._clock = itertools.count(1)
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ sizes
    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def tokens_held(self) -> int:
        """Positions the entries' blocks can hold (what the bound counts)."""
        return sum(len(e.kv.blocks) for e in self._entries) * self.pool.block_size

    def _key(self, tenant: str) -> str:
        return SHARED_TENANT if self.shared else tenant

    # ------------------------------------------------------------------ lookup
    def _walk(self, tenant: str, ids: Sequence[int]) -> tuple[int, Optional[_Node]]:
        """``(matched length, deepest node whose subtree holds the match)``."""
        node = self._roots.get(self._key(tenant))
        if node is None:
            return 0, None
        m = 0
        while m < len(ids):
            child = node.children.get(int(ids[m]))
            if child is None:
                break
            e = child.edge
            j = 0
            while j < len(e) and m + j < len(ids) and e[j] == ids[m + j]:
                j += 1
            m += j
            node = child
            if j < len(e):
                break
        return m, node

    @staticmethod
    def _any_entry(node: _Node) -> Optional[_Entry]:
        """The most recently used entry in ``node``'s subtree."""
        best, stack = None, [node]
        while stack:
            n = stack.pop()
            if n.entry is not None and (best is None or n.entry.used > best.used):
                best = n.entry
            stack.extend(n.children.values())
        return best

    def longest_prefix(self, tenant: str, ids: Sequence[int]) -> int:
        """Length of the longest cached prefix of ``ids`` for ``tenant`` (no side effects)."""
        m, node = self._walk(tenant, ids)
        return m if node is not None and self._any_entry(node) is not None else 0

    def restore(self, tenant: str, ids: Sequence[int], kv: Any, max_tokens: Optional[int] = None) -> int:
        """Copy the KV of the longest cached prefix of ``ids`` (at most ``max_tokens``) into the empty ``kv``.

        Args:
            tenant: whose entries may be used.
            ids: the prompt's token ids.
            kv: the request's cache, empty (length 0).
            max_tokens: most tokens to reuse (the engine leaves at least one to prefill).

        Returns:
            tokens reused (``kv.length`` afterwards); 0 on a miss, a match shorter
            than ``min_tokens``, or no free KV blocks for the copy.
        """
        limit = len(ids) if max_tokens is None else min(len(ids), max_tokens)
        self.stats.lookups += 1
        self.stats.lookup_tokens += max(0, limit)
        if limit < self.min_tokens or kv.length != 0:
            return 0
        m, node = self._walk(tenant, ids[:limit])
        entry = self._any_entry(node) if node is not None else None
        if entry is None or m < self.min_tokens:
            return 0
        from adaspec.model.kv import PoolExhausted

        try:
            kv.reserve(m)
        except PoolExhausted:
            self.evict_all()  # the pool is short: cached prefixes go first
            return 0
        _copy_blocks(self.pool, entry.kv.blocks, kv.blocks, m)
        kv.length = m
        entry.used = next(self._clock)
        self.stats.hits += 1
        self.stats.tokens_saved += m
        return m

    # ------------------------------------------------------------------ insert
    def insert(self, tenant: str, ids: Sequence[int], kv: Any) -> bool:
        """Cache a copy of the first ``len(ids)`` positions of ``kv`` (which holds ``ids``' KV) under ``tenant``.

        Returns:
            True if stored (False: too short, already covered, or no room).
        """
        ids = tuple(int(t) for t in ids)
        if not self._wanted(tenant, ids) or kv.length < len(ids):
            return False
        from adaspec.model.kv import PoolExhausted

        copy = self.target.new_cache()
        try:
            copy.reserve(len(ids))
        except PoolExhausted:
            copy.release()
            return False
        _copy_blocks(self.pool, kv.blocks, copy.blocks, len(ids))
        copy.length = len(ids)
        self._add(tenant, ids, copy)
        return True

    def donate(self, tenant: str, ids: Sequence[int], kv: Any) -> bool:
        """Like :meth:`insert` but take ``kv`` itself (a finished request's cache; no copy).

        ``kv`` is truncated to ``len(ids)`` and owned by the cache afterwards (or
        released at once when not stored).
        """
        ids = tuple(int(t) for t in ids)
        if not self._wanted(tenant, ids) or kv.length < len(ids):
            kv.release()
            return False
        kv.truncate(len(ids))
        self._add(tenant, ids, kv)
        return True

    def _wanted(self, tenant: str, ids: tuple[int, ...]) -> bool:
        if len(ids) < self.min_tokens or -(-len(ids) // self.pool.block_size) * self.pool.block_size > self.max_tokens:
            return False
        m, node = self._walk(tenant, ids)
        if m == len(ids) and node is not None:
            covered = self._any_entry(node)
            if covered is not None:  # an entry already holds this sequence's KV
                covered.used = next(self._clock)
                return False
        return True

    def _add(self, tenant: str, ids: tuple[int, ...], kv: Any) -> None:
        key = self._key(tenant)
        root = self._roots.setdefault(key, _Node())
        node, m = root, 0
        while m < len(ids):
            child = node.children.get(ids[m])
            if child is None:
                leaf = _Node(edge=ids[m:], parent=node)
                node.children[ids[m]] = leaf
                node, m = leaf, len(ids)
                break
            e = child.edge
            j = 0
            while j < len(e) and m + j < len(ids) and e[j] == ids[m + j]:
                j += 1
            if j < len(e):  # split the edge at j
                mid = _Node(edge=e[:j], parent=node)
                node.children[ids[m]] = mid
                child.edge = e[j:]
                child.parent = mid
                mid.children[e[j]] = child
                child = mid
            node, m = child, m + j
        # entries this one extends (on its path, ending above it) are redundant now
        up = node.parent
        while up is not None:
            if up.entry is not None:
                self._drop(up.entry)
            up = up.parent
        if node.entry is not None:
            self._drop(node.entry)
        entry = _Entry(tenant=key, tokens=ids, kv=kv, node=node, used=next(self._clock))
        node.entry = entry
        self._entries.append(entry)
        self._evict_to(self.max_tokens)

    # ------------------------------------------------------------------ eviction
    def _drop(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        entry.kv.release()
        node = entry.node
        node.entry = None
        # prune empty leaves and merge single-child chains
        while node.parent is not None and node.entry is None and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent
        if node.parent is not None and node.entry is None and len(node.children) == 1:
            (only,) = node.children.values()
            only.edge = node.edge + only.edge
            only.parent = node.parent
            node.parent.children[node.edge[0]] = only

    def _evict_to(self, max_tokens: int) -> None:
        while self._entries and self.tokens_held > max_tokens:
            self._drop(min(self._entries, key=lambda e: e.used))
            self.stats.evictions += 1

    def evict_all(self) -> None:
        """Drop every entry (their blocks go back to the pool)."""
        self._evict_to(0)

    def forget_tenant(self, tenant: str) -> None:
        """Drop ``tenant``'s entries (a shared cache holds none per tenant: nothing is dropped)."""
        if self.shared:
            return
        for e in [e for e in self._entries if e.tenant == tenant]:
            self._drop(e)
        self._roots.pop(tenant, None)


def _copy_blocks(pool: Any, src: Sequence[int], dst: Sequence[int], length: int) -> None:
    """Copy the KV of positions ``[0, length)`` from blocks ``src`` to blocks ``dst`` (whole blocks)."""
    n = -(-length // pool.block_size)
    if n == 0:
        return
    s = torch.tensor(list(src[:n]), dtype=torch.long)
    d = torch.tensor(list(dst[:n]), dtype=torch.long)
    pool.keys[:, d] = pool.keys[:, s]
    pool.values[:, d] = pool.values[:, s]
