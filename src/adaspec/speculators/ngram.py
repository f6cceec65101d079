"""Prompt lookup: n-gram matching in the request's own context.

Follows prompt lookup decoding (Saxena 2023, used by transformers'
``prompt_lookup_num_tokens`` and vLLM's ``ngram`` method): find the most recent
earlier occurrence of the context's last n tokens (n from ``max_ngram`` down to
``min_ngram``) and propose the tokens that followed it.
"""

from __future__ import annotations

from typing import Sequence

from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, ProposeContext


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
