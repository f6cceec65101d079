"""Prompt lookup: n-gram matching in the request's own context.

Follows prompt lookup decoding (Saxena 2023, used by transformers'
``prompt_lookup_num_tokens`` and vLLM's ``ngram`` method): find the most recent
earlier occurrence of the context's last n tokens (n from ``max_ngram`` down to
``min_ngram``) and propose the tokens that followed it.
"""

from __future__ import annotations

from typing import Sequence

from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, ProposeContext, TokenTree, TreeClaim


def find_ngram_continuation(
    token_ids: Sequence[int], max_draft_tokens: int, min_ngram: int = 1, max_ngram: int = 3
) -> list[int]:
    """Return the tokens that followed the latest earlier match of the context's suffix.

    Args:
        token_ids: the context, length T.
        max_draft_tokens: most tokens to return.
        min_ngram / max_ngram: suffix lengths tried, longest first.

    Returns:
        0..max_draft_tokens token ids (empty when no suffix of length >= min_ngram recurs).

    Cost is O(T * max_ngram) per call, bounded by the request's own length.
    """
    T = len(token_ids)
    if max_draft_tokens <= 0 or T < 2:
        return []
    ids = list(token_ids)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):
        suffix = ids[T - n :]
        # Latest match first: recent context predicts best; the match must end
        # before the suffix itself starts so it has a continuation.
        for start in range(T - n - 1, -1, -1):
            if ids[start : start + n] == suffix:
                cont = ids[start + n : start + n + max_draft_tokens]
                if cont:
                    return cont
    return []


def find_ngram_continuations(
    token_ids: Sequence[int], max_draft_tokens: int, min_ngram: int = 1, max_ngram: int = 3, max_matches: int = 3,
    max_scan: int = 4096,
) -> list[list[int]]:
    """Up to ``max_matches`` distinct continuations of the context's suffix, latest occurrence first.

    The longest suffix length (``max_ngram`` down to ``min_ngram``) with any
    earlier occurrence is used; each further occurrence whose continuation
    differs adds a branch (prompt lookup's matches as a tree). Only the last
    ``max_scan`` tokens are searched.

    Returns:
        0..max_matches continuations of 1..max_draft_tokens tokens.
    """
    T = len(token_ids)
    if max_draft_tokens <= 0 or T < 2 or max_matches <= 0:
        return []
    ids = list(token_ids[-max_scan:])
    T = len(ids)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):
        suffix = ids[T - n :]
        out: list[list[int]] = []
        for start in range(T - n - 1, -1, -1):
            if ids[start : start + n] == suffix:
                cont = ids[start + n : start + n + max_draft_tokens]
                if cont and cont not in out:
                    out.append(cont)
                    if len(out) >= max_matches:
                        break
        if out:
            return out
    return []


class NgramSpeculator(Speculator):
    """Prompt-lookup speculator (model-free, no learned state).

    Args:
        min_ngram: shortest suffix to match (>= 1). Default 1.
        max_ngram: longest suffix to match. Default 3.

    Raises:
        ValueError: if ``min_ngram < 1`` or ``max_ngram < min_ngram``.
    """

    name = "ngram"

    def __init__(self, min_ngram: int = 1, max_ngram: int = 3) -> None:
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        draft = find_ngram_continuation(ctx.token_ids, max_draft_tokens, self.min_ngram, self.max_ngram)
        return DraftProposal(token_ids=draft, speculator=self.name)

    def propose_tree(self, ctx: ProposeContext, max_nodes: int, max_depth: int, branching: int = 3) -> TokenTree:
        """Prompt lookup's distinct matches as branches of one tree (llama.cpp's lookup trees).

        Returns:
            a :class:`TokenTree` of at most ``max_nodes`` nodes (claims
            ``source="ngram"``, deterministic, no confidence), latest match first.
        """
        tree = TokenTree()
        for cont in find_ngram_continuations(ctx.token_ids, max_depth, self.min_ngram, self.max_ngram, branching):
            parent = -1
            for t in cont:
                node = tree.child(parent, t)
                if node is None:
                    if tree.num_nodes >= max_nodes:
                        break
                    node = tree.add(parent, t, TreeClaim(self.name))
                parent = node
        return tree
