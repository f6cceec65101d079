"""The suffix trie under the suffix speculator: stored sequences, counted windows, matching.

Follows the data structure of SuffixDecoding (Oliaro et al. 2024, arXiv
2411.04975), kept apart from the policy as Arctic Inference keeps its
``suffix_tree`` apart from its cache (:mod:`adaspec.speculators.suffix` holds
the corpora, the tenants and the speculator).

Glossary:

- **window**: ``tokens[i : i + max_depth]`` for a position ``i`` of a stored
  sequence. The trie holds every window of every stored sequence, so any
  substring of length <= ``max_depth`` is a path from the root.
- **count(path)**: how many windows pass through the path's node.
- **cont(node)**: sum of the children's counts: windows that continue past the
  node (windows that end there, at a sequence end or at the depth limit, do
  not count, and nor does the live context's own occurrence).
- **tail**: a path seen in one window only, stored as one record pointing into
  its sequence rather than a chain of nodes.
- **match length**: how many context tokens a :class:`Match` has matched.

:meth:`SuffixTrie.check_integrity` recounts every window by brute force (for tests).
"""

from __future__ import annotations

from array import array
from typing import Optional, Sequence

# _best[n] when the most frequent child must be recomputed (after an eviction
# decremented the cached one); _tok1[n] when the node has no single inline
# child. Token ids are validated to be >= 0, so -1 is never a real token.
_UNKNOWN = -1
_NONE = -1
MAX_TOKEN_ID = 2**62  # ids must be in [0, MAX_TOKEN_ID) (they live in int64 arrays)


class StoredSequence:
    """One stored token sequence (a request's indexed prompt tail and output).

    Attributes:
        tokens: the indexed tokens, in order (int64 array: compact, and not
            tracked by the cyclic garbage collector).
        active: ``[start, node]`` for each window of a live sequence whose
            current end is a materialized node of depth < max_depth (a window
            inside its own tail needs no work per token); None once closed.
        key: position in its owner's LRU order.
        removed: True once evicted from the trie.
    """

    __slots__ = ("tokens", "active", "key", "removed")

    def __init__(self, key: int = 0) -> None:
        self.tokens = array("q")
        self.active: Optional[list[list[int]]] = []
        self.key = key
        self.removed = False

    @property
    def closed(self) -> bool:
        return self.active is None


class Match:
    """A cursor: where a pattern ends in a trie.

    Attributes:
        node: the node the pattern ends at, or -1 when it ends inside a tail.
        tail: the tail the pattern ends inside, or -1.
        pos: with a tail: index into the tail's sequence of the next token.
        length: match length (pattern tokens matched so far).
    """

    __slots__ = ("node", "tail", "pos", "length")

    def __init__(self, node: int, tail: int, pos: int, length: int) -> None:
        self.node = node
        self.tail = tail
        self.pos = pos
        self.length = length


class SuffixTrie:
    """Depth-limited, tail-compressed suffix trie with counts, over stored sequences.

    Every window ``tokens[i : i + max_depth]`` of every sequence is a root path.
    A path seen in one window only is a *tail* record (sequence, start, depth)
    standing for the rest of that window, not a chain of nodes; a path shared by
    two windows is split into nodes one token at a time as they diverge. So a
    never-repeating stream costs O(1) records per token, and a repeated
    substring costs one node per repeated prefix.

    Appending a token to a live sequence costs O(its windows that end at a
    node) <= ``max_depth``; removing a sequence costs O(len * max_depth);
    matching a suffix costs O(max_match_len ** 2) at worst. None of them depends
    on how much else is stored.

    Storage is flat: nodes are indices into int64 arrays (count, cont, best
    child, one inline child) plus a dict of children for branching nodes, and
    child references are ints (``ref >= 0``: node id; ``ref < 0``: tail
    ``~ref``). That keeps memory near 50 bytes per record and keeps the trie
    out of the cyclic garbage collector's way (no per-node Python objects).

    Per node ``n``: ``count[n]`` windows pass through (or end at) it;
    ``cont[n]`` is the sum of its children's counts (windows continuing past).

    Args:
        max_depth: longest window indexed (>= 2).

    Raises:
        ValueError: if ``max_depth < 2``.
    """

    def __init__(self, max_depth: int) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        # Nodes; id 0 is the root.
        self._count = array("q", [0])
        self._cont = array("q", [0])
        self._best = array("q", [_UNKNOWN])
        self._tok1 = array("q", [_NONE])  # the only child's token, when exactly one
        self._ref1 = array("q", [0])  # ... and its reference
        self._kids: list[Optional[dict[int, int]]] = [None]  # token -> ref, when >= 2 children
        self._free_nodes: list[int] = []
        # Tails.
        self._tseq: list[Optional[StoredSequence]] = []
        self._tstart = array("q")
        self._tdepth = array("q")
        self._free_tails: list[int] = []
        self.num_nodes = 0  # node and tail records below the root
        self.num_tokens = 0  # tokens of the stored sequences

    # -- records ----------------------------------------------------------

    def _new_node(self, count: int) -> int:
        self.num_nodes += 1
        if self._free_nodes:
            n = self._free_nodes.pop()
            self._count[n] = count
            self._cont[n] = 0
            self._best[n] = _UNKNOWN
            self._tok1[n] = _NONE
            self._kids[n] = None
            return n
        self._count.append(count)
        self._cont.append(0)
        self._best.append(_UNKNOWN)
        self._tok1.append(_NONE)
        self._ref1.append(0)
        self._kids.append(None)
        return len(self._kids) - 1

    def _free_node(self, n: int) -> None:
        self.num_nodes -= 1
        self._kids[n] = None
        self._tok1[n] = _NONE
        self._count[n] = 0
        self._free_nodes.append(n)

    def _new_tail(self, seq: StoredSequence, start: int, depth: int) -> int:
        """Returns the tail's reference (negative)."""
        self.num_nodes += 1
        if self._free_tails:
            t = self._free_tails.pop()
            self._tseq[t] = seq
            self._tstart[t] = start
            self._tdepth[t] = depth
            return ~t
        self._tseq.append(seq)
        self._tstart.append(start)
        self._tdepth.append(depth)
        return ~(len(self._tseq) - 1)

    def _free_tail(self, t: int) -> None:
        self.num_nodes -= 1
        self._tseq[t] = None
        self._free_tails.append(t)

    def _get(self, n: int, tok: int) -> Optional[int]:
        if self._tok1[n] == tok:
            return self._ref1[n]
        d = self._kids[n]
        return d.get(tok) if d is not None else None

    def _put(self, n: int, tok: int, ref: int) -> None:
        """Insert or replace child ``tok`` of node ``n``."""
        t1 = self._tok1[n]
        if t1 == tok:
            self._ref1[n] = ref
            return
        d = self._kids[n]
        if d is not None:
            d[tok] = ref
        elif t1 == _NONE:
            self._tok1[n] = tok
            self._ref1[n] = ref
        else:
            self._kids[n] = {t1: self._ref1[n], tok: ref}
            self._tok1[n] = _NONE

    def _delete(self, n: int, tok: int) -> None:
        if self._tok1[n] == tok:
            self._tok1[n] = _NONE
            return
        d = self._kids[n]
        del d[tok]  # type: ignore[union-attr]
        if len(d) == 1:  # type: ignore[arg-type]
            ((t, r),) = d.items()  # type: ignore[union-attr]
            self._kids[n] = None
            self._tok1[n] = t
            self._ref1[n] = r

    def _items(self, n: int) -> list[tuple[int, int]]:
        if self._tok1[n] != _NONE:
            return [(self._tok1[n], self._ref1[n])]
        d = self._kids[n]
        return list(d.items()) if d is not None else []

    def _ref_count(self, ref: int) -> int:
        return self._count[ref] if ref >= 0 else 1

    def _tail_end(self, t: int) -> int:
        """One past the last token a tail stands for (grows with a live sequence)."""
        return min(len(self._tseq[t].tokens), self._tstart[t] + self.max_depth)  # type: ignore[union-attr]

    # -- update -----------------------------------------------------------

    def add(self, tokens: Sequence[int], live: bool = False, key: int = 0) -> StoredSequence:
        """Store a sequence; ``live=True`` keeps it open for ``append``."""
        seq = StoredSequence(key)
        for t in tokens:
            self.append(seq, t)
        if not live:
            self.close(seq)
        return seq

    def append(self, seq: StoredSequence, token: int) -> None:
        """Append ``token`` (an int in [0, MAX_TOKEN_ID)) to the live ``seq``, extending its windows.

        Raises:
            ValueError: if ``seq`` is closed.
        """
        active = seq.active
        if active is None:
            raise ValueError("cannot append to a closed sequence")
        tokens = seq.tokens
        j = len(tokens)
        tokens.append(token)
        self.num_tokens += 1
        D = self.max_depth
        count, cont, best, tok1, ref1, kids = self._count, self._cont, self._best, self._tok1, self._ref1, self._kids
        active.append([j, 0])  # the window starting at j, at the root (depth 0)
        keep = []
        for entry in active:
            start, n = entry
            depth = j - start  # depth of node n; < D by the invariant on `active`
            cont[n] += 1
            if tok1[n] == token:
                ref = ref1[n]
            else:
                d = kids[n]
                ref = d.get(token) if d is not None else None
            if ref is None:
                # First time this path continues with `token`: the window goes
                # inside its own tail and grows with the sequence for free.
                first = tok1[n] == _NONE and kids[n] is None
                self._put(n, token, self._new_tail(seq, start, depth))
                b = best[n]
                if first or (b != _UNKNOWN and token < b and self._ref_count(self._get(n, b)) == 1):  # type: ignore[arg-type]
                    best[n] = token
                continue
            if ref < 0:
                ref = self._split(n, token, ~ref, seq)
            c = count[ref] + 1
            count[ref] = c
            b = best[n]
            if b != token and b != _UNKNOWN:
                cb = self._ref_count(self._get(n, b))  # type: ignore[arg-type]
                if c > cb or (c == cb and token < b):
                    best[n] = token
            if depth + 1 < D:
                entry[1] = ref
                keep.append(entry)
        seq.active = keep

    def _split(self, parent: int, token: int, t: int, appending: StoredSequence) -> int:
        """Materialize the first token of tail ``t`` as a node of count 1 (the tail's window)."""
        node = self._new_node(1)
        self._put(parent, token, node)
        depth = self._tdepth[t] + 1
        self._tdepth[t] = depth
        other = self._tseq[t]
        assert other is not None
        start = self._tstart[t]
        pos = start + depth
        if depth < self.max_depth and pos < len(other.tokens):
            nxt = other.tokens[pos]
            self._tok1[node] = nxt
            self._ref1[node] = ~t
            self._cont[node] = 1
            self._best[node] = nxt
        else:
            # The tail is used up; its window now ends at `node`. If it can still
            # grow (live sequence, depth left) it is walked per token again. It is
            # never `appending`'s own window: two windows of one sequence that
            # meet here end at different positions, and the earlier one's tail
            # reaches the token just appended.
            self._free_tail(t)
            if depth < self.max_depth and other.active is not None and other is not appending:
                other.active.append([start, node])
        return node

    def close(self, seq: StoredSequence) -> None:
        """Stop growing ``seq``; its windows keep their current extent."""
        seq.active = None

    def remove(self, seq: StoredSequence) -> None:
        """Decrement every window of ``seq`` out of the trie, freeing records that reach zero."""
        if seq.removed:
            return
        tokens = seq.tokens
        n = len(tokens)
        D = self.max_depth
        count, cont, best = self._count, self._cont, self._best
        for start in range(n):
            end = min(n, start + D)
            node = 0
            parent_alive = True
            dead = []
            i = start
            while i < end:
                tok = tokens[i]
                ref = self._get(node, tok)
                if ref is None:
                    raise AssertionError("suffix trie corrupted: a stored window's path is missing")
                cont[node] -= 1
                if best[node] == tok:
                    best[node] = _UNKNOWN
                if ref < 0:
                    t = ~ref
                    if self._tseq[t] is not seq or self._tstart[t] != start:
                        raise AssertionError("suffix trie corrupted: foreign tail on a window's path")
                    if parent_alive:
                        self._delete(node, tok)
                    self._free_tail(t)
                    break
                c = count[ref] - 1
                count[ref] = c
                if c == 0:
                    # Only this window passed here: the rest of its path dies too.
                    if parent_alive:
                        self._delete(node, tok)
                        parent_alive = False
                    dead.append(ref)
                node = ref
                i += 1
            for x in dead:
                self._free_node(x)
        self.num_tokens -= n
        seq.active = None
        seq.removed = True

    # -- query ------------------------------------------------------------

    def walk(self, pattern: Sequence[int], lo: int = 0) -> Optional[Match]:
        """Follow ``pattern[lo:]`` (ids >= 0) from the root; None if it never occurred."""
        tok1, ref1, kids = self._tok1, self._ref1, self._kids
        node = 0
        i = lo
        n = len(pattern)
        while i < n:
            tok = pattern[i]
            if tok1[node] == tok:
                ref = ref1[node]
            else:
                d = kids[node]
                if d is None:
                    return None
                ref = d.get(tok)
                if ref is None:
                    return None
            i += 1
            if ref < 0:
                t = ~ref
                toks = self._tseq[t].tokens  # type: ignore[union-attr]
                p = self._tstart[t] + self._tdepth[t] + 1
                end = self._tail_end(t)
                while i < n:
                    if p >= end or toks[p] != pattern[i]:
                        return None
                    p += 1
                    i += 1
                return Match(-1, t, p, n - lo)
            node = ref
        return Match(node, -1, 0, n - lo)

    def has_continuation(self, m: Match) -> bool:
        if m.tail >= 0:
            return m.pos < self._tail_end(m.tail)
        return self._cont[m.node] > 0

    def longest_match(self, context: Sequence[int], max_match_len: int) -> Optional[Match]:
        """Longest suffix of ``context`` (<= max_match_len) that occurred and continued.

        The live context's own occurrence never qualifies: it has no
        continuation yet. Cost O(max_match_len ** 2) lookups at worst.
        """
        n = len(context)
        for lo in range(max(0, n - max_match_len), n):
            m = self.walk(context, lo)
            if m is not None and self.has_continuation(m):
                return m
        return None

    def live_match(self, seq: StoredSequence, context: list[int], max_match_len: int) -> tuple[bool, Optional[Match]]:
        """``longest_match`` in O(max_depth) when ``seq`` is live here and ends with ``context``.

        Every suffix of a live indexed sequence that also occurred elsewhere is a
        node on one of its active windows, so no walk from the root is needed.

        Returns:
            ``(usable, match)``: ``usable`` is False when ``seq`` is closed,
            evicted or out of step with ``context`` (then call ``longest_match``).
        """
        toks = seq.tokens
        n = len(context)
        if seq.active is None or seq.removed or len(toks) < n or toks[len(toks) - n :].tolist() != context:
            return False, None
        cont = self._cont
        end = len(toks)
        best_len = 0
        best_node = -1
        for start, node in seq.active:
            length = end - start
            if best_len < length <= max_match_len and cont[node] > 0:
                best_len, best_node = length, node
        if best_node < 0:
            return True, None
        return True, Match(best_node, -1, 0, best_len)

    def next_token(self, m: Match) -> Optional[tuple[int, float]]:
        """Most frequent continuation after ``m`` and its conditional frequency; advances ``m``.

        Returns:
            ``(token, count(child) / cont(node))``, 1.0 inside a tail; None when
            nothing continues (sequence end or depth limit).
        """
        if m.tail >= 0:
            t = m.tail
            if m.pos >= self._tail_end(t):
                return None
            tok = self._tseq[t].tokens[m.pos]  # type: ignore[union-attr]
            m.pos += 1
            m.length += 1
            return tok, 1.0
        n = m.node
        total = self._cont[n]
        if total <= 0:
            return None
        b = self._best[n]
        if b == _UNKNOWN:
            b = max(self._items(n), key=lambda kv: (self._ref_count(kv[1]), -kv[0]))[0]
            self._best[n] = b
        ref = self._get(n, b)
        assert ref is not None
        if ref < 0:
            m.node, m.tail = -1, ~ref
            m.pos = self._tstart[~ref] + self._tdepth[~ref] + 1
            conf = 1.0 / total
        else:
            m.node = ref
            conf = self._count[ref] / total
        m.length += 1
        return b, min(1.0, conf)

    def continuations(self, m: Match, limit: int) -> list[tuple[int, float, Match]]:
        """The ``limit`` most frequent continuations after ``m`` (``m`` is not moved).

        Returns:
            ``(token, count(child) / cont(node), cursor after token)``, most
            frequent first (ties: smallest token id); one entry inside a tail;
            empty when nothing continues.
        """
        if limit <= 0:
            return []
        if m.tail >= 0:
            t = m.tail
            if m.pos >= self._tail_end(t):
                return []
            tok = self._tseq[t].tokens[m.pos]  # type: ignore[union-attr]
            return [(int(tok), 1.0, Match(-1, t, m.pos + 1, m.length + 1))]
        total = self._cont[m.node]
        if total <= 0:
            return []
        items = sorted(self._items(m.node), key=lambda kv: (-self._ref_count(kv[1]), kv[0]))[:limit]
        out = []
        for tok, ref in items:
            if ref < 0:
                nm = Match(-1, ~ref, self._tstart[~ref] + self._tdepth[~ref] + 1, m.length + 1)
                conf = 1.0 / total
            else:
                nm = Match(ref, -1, 0, m.length + 1)
                conf = self._count[ref] / total
            out.append((int(tok), min(1.0, conf), nm))
        return out

    # -- integrity ----------------------------------------------------------

    def check_integrity(self, sequences: Sequence[StoredSequence]) -> None:
        """Check every count against a brute-force recount of ``sequences``' windows (slow).

        Raises:
            AssertionError: naming the first inconsistency.
        """
        D = self.max_depth
        expected: dict[tuple[int, ...], int] = {}
        total = 0
        for seq in sequences:
            toks = seq.tokens.tolist()
            total += len(toks)
            for s in range(len(toks)):
                for e in range(s + 1, min(len(toks), s + D) + 1):
                    key = tuple(toks[s:e])
                    expected[key] = expected.get(key, 0) + 1
        assert total == self.num_tokens, f"num_tokens {self.num_tokens} != {total}"
        actual: dict[tuple[int, ...], int] = {}
        records = 0
        stack: list[tuple[int, tuple[int, ...]]] = [(0, ())]
        while stack:
            node, path = stack.pop()
            items = self._items(node)
            d = self._kids[node]
            assert d is None or len(d) >= 2, f"dict of children with < 2 entries at {path}"
            assert d is None or self._tok1[node] == _NONE, f"inline child beside a dict at {path}"
            assert self._cont[node] == sum(self._ref_count(r) for _, r in items), f"cont wrong at {path}"
            if items and self._best[node] != _UNKNOWN:
                top = max(items, key=lambda kv: (self._ref_count(kv[1]), -kv[0]))[0]
                assert self._best[node] == top, f"stale best child at {path}"
            for tok, ref in items:
                records += 1
                p = path + (tok,)
                if ref < 0:
                    t = ~ref
                    seq = self._tseq[t]
                    assert seq is not None and not seq.removed, f"tail of an evicted sequence at {p}"
                    toks = seq.tokens.tolist()
                    start, depth = self._tstart[t], self._tdepth[t]
                    assert depth == len(path) and toks[start + depth] == tok, f"tail keyed wrongly at {p}"
                    assert toks[start : start + depth] == list(path), f"tail off its path at {p}"
                    for e in range(start + depth + 1, self._tail_end(t) + 1):
                        k = tuple(toks[start:e])
                        actual[k] = actual.get(k, 0) + 1
                else:
                    assert self._count[ref] > 0, f"zero-count node at {p}"
                    actual[p] = actual.get(p, 0) + self._count[ref]
                    stack.append((ref, p))
        assert records == self.num_nodes, f"num_nodes {self.num_nodes} != {records} records"
        assert actual == expected, "path counts differ from a recount of the stored windows"
        # Active windows end where their tokens lead.
        for seq in sequences:
            for start, node in seq.active or []:
                m = self.walk(seq.tokens.tolist(), start)
                assert m is not None and m.node == node, f"active window {start} is not at its node"
