"""Run adaspec's adaptive speculator as vLLM's ``custom_class`` proposer.

vLLM (>= 0.32) loads a user class as its drafter with::

    LLM(model=..., speculative_config={
        "method": "custom_class",
        "model": "adaspec.integrations.vllm_proposer.AdaspecSuffixProposer",
        "num_speculative_tokens": 8})

The class is built with the ``VllmConfig``, gets ``load_model(...)``, then, each
step, ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
slot_mappings=None)`` for the whole batch and returns one draft list per
request (lengths may differ; ``[]`` means no draft). vLLM brings tensor and
pipeline parallelism and multi-node serving; this adapter brings the learning
speculator. It imports nothing from vLLM or transformers: the batch arrives as
numpy arrays and token lists.

vLLM's proposer hook identifies requests only by their row in the persistent
batch, so the adapter tracks each row's token history: a row whose stored
history is no longer a prefix of its current tokens holds a new request (the
old one is stopped and its tokens stay learned); new tokens of a known request
are passed to ``observe``.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import numpy as np

from adaspec.controller import Controller
from adaspec.speculators.base import Speculator
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext, common_prefix_len

_ids = itertools.count()


class AdaspecSuffixProposer:
    """vLLM ``custom_class`` drafter backed by an adaspec speculator.

    Args:
        vllm_config: vLLM's config; ``speculative_config.num_speculative_tokens``
            sets the lookahead (default 8 when absent); drafts are cut so they
            never pass ``model_config.max_model_len``.
        speculator: the speculator to run (default: a fresh SuffixSpeculator).
        tenant: tenant whose learned state is used. Default "default".
    """

    def __init__(self, vllm_config: Any = None, *args: Any, speculator: Optional[Speculator] = None,
                 tenant: str = DEFAULT_TENANT, **kwargs: Any) -> None:
        spec_cfg = getattr(vllm_config, "speculative_config", None)
        self.lookahead = int(getattr(spec_cfg, "num_speculative_tokens", None) or 8)
        # Drafts never reach past the context window (docs/FAULT_CASES.md, F13): vLLM would
        # have to score positions the model does not have.
        model_cfg = getattr(vllm_config, "model_config", None)
        window = getattr(model_cfg, "max_model_len", None)
        self.max_model_len: Optional[int] = int(window) if window else None
        if speculator is None:
            from adaspec.speculators.suffix import SuffixSpeculator

            speculator = SuffixSpeculator()
        self.speculator = speculator
        self.tenant = tenant
        self._rows: dict[int, tuple[str, list[int], int]] = {}  # row -> (request_id, tokens seen, prompt len)
        self._last_draft: dict[int, list[int]] = {}  # row -> the draft proposed for it last step

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Model-free speculator: nothing to load."""

    def propose(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Draft tokens for every request in the batch.

        Args:
            sampled_token_ids: per request, the tokens sampled this step (empty
                for a request still in chunked prefill: it gets no draft).
            num_tokens_no_spec: ``[num_reqs]`` int, valid tokens per row of
                ``token_ids_cpu`` (prompt + output, drafts excluded).
            token_ids_cpu: ``[num_reqs, max_model_len]`` int token ids.

        Returns:
            One list of draft token ids per request, each of length 0..lookahead.
        """
        drafts: list[list[int]] = []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[row])
            if not sampled or n == 0:
                drafts.append([])
                continue
            room = self.lookahead if self.max_model_len is None else min(self.lookahead, self.max_model_len - n)
            if room <= 0:
                drafts.append([])
                continue
            tokens = [int(t) for t in token_ids_cpu[row, :n]]
            request_id, prompt_len = self._track(row, tokens, len(tokens) - len(sampled))
            ctx = ProposeContext(request_id=request_id, token_ids=tokens, num_prompt_tokens=prompt_len,
                                 tenant=self.tenant)
            draft = list(self.speculator.propose(ctx, room).token_ids)[:room]
            self._last_draft[row] = draft
            drafts.append(draft)
        live = set(range(len(sampled_token_ids)))
        for row in [r for r in self._rows if r not in live]:
            self.speculator.stop_request(self._rows.pop(row)[0])
            self._last_draft.pop(row, None)
        return drafts

    def _track(self, row: int, tokens: list[int], prompt_len_guess: int) -> tuple[str, int]:
        known = self._rows.get(row)
        if known is not None:
            rid, seen, prompt_len = known
            if len(seen) <= len(tokens) and tokens[: len(seen)] == seen:
                new = tokens[len(seen):]
                if new:
                    # vLLM committed the accepted prefix of last step's draft plus one
                    # token: tell the speculator how its draft fared.
                    draft = self._last_draft.pop(row, [])
                    accepted = common_prefix_len(draft, new[:-1])
                    self.speculator.observe(rid, new, accepted, len(draft))
                self._rows[row] = (rid, tokens, prompt_len)
                return rid, prompt_len
            self.speculator.stop_request(rid)
        self._last_draft.pop(row, None)
        rid = f"vllm-row{row}-{next(_ids)}"
        prompt_len = max(1, prompt_len_guess)
        self.speculator.start_request(rid, tokens[:prompt_len], self.tenant)
        if tokens[prompt_len:]:
            self.speculator.observe(rid, tokens[prompt_len:], 0, 0)
        self._rows[row] = (rid, tokens, prompt_len)
        return rid, prompt_len


class ControlledDrafter(Speculator):
    """A controller and its speculators presented as the one drafter a proposer hook expects.

    Fans the request lifecycle out as the engine does (every speculator sees
    every request and committed token; the controller judges its drafts) and
    drafts through ``controller.propose``.
    """

    name = "controlled"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.speculators = {s.name: s for s in controller.speculators}

    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        for s in self.speculators.values():
            s.start_request(request_id, prompt_ids, tenant)
        self.controller.start_request(request_id, prompt_ids, tenant)

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        return self.controller.propose(ctx, max_draft_tokens, self.speculators).proposal

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        self.controller.observe(request_id, token_ids, num_accepted, num_draft_tokens)
        for s in self.speculators.values():
            s.observe(request_id, token_ids, num_accepted, num_draft_tokens)

    def stop_request(self, request_id: str) -> None:
        for s in self.speculators.values():
            s.stop_request(request_id)
        self.controller.stop_request(request_id)

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


class AdaspecAtlasProposer(AdaspecSuffixProposer):
    """vLLM ``custom_class`` drafter running adaspec's confidence-aware controller over the suffix speculator.

    The same :class:`~adaspec.controller.ConfidenceAwareController` as
    ``--speculator atlas``, without the static draft head (the hook passes no
    hidden states): each step it drafts, for each request, the suffix
    speculator's draft cut to the length that maximises expected tokens per
    second, or nothing. vLLM reports no verify times through the hook, so the
    cost model keeps its flat prior (verification as cheap for k tokens as for
    one, as on a GPU).

    Load with ``"model": "adaspec.integrations.vllm_proposer.AdaspecAtlasProposer"``.

    Attributes:
        controller: the controller (its acceptance estimates, ``choices``).
    """

    def __init__(self, vllm_config: Any = None, *args: Any, tenant: str = DEFAULT_TENANT, **kwargs: Any) -> None:
        from adaspec.controller import ConfidenceAwareController
        from adaspec.speculators.suffix import SuffixSpeculator

        self.controller = ConfidenceAwareController(adaptive=SuffixSpeculator())
        super().__init__(vllm_config, *args, speculator=ControlledDrafter(self.controller), tenant=tenant, **kwargs)
