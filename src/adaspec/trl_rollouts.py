"""TRL's ``GRPOTrainer`` with adaspec generating the rollouts (the optional ``trl`` extra).

TRL (``trl`` 1.16 on PyPI) takes an experimental ``rollout_func(prompts,
trainer)`` that must return ``prompt_ids``, ``completion_ids`` and
``logprobs``; it needs no vLLM for it. :class:`AdaspecRollouts` is such a
function over an :class:`adaspec.engine.Engine`:

- whenever ``trainer.state.global_step`` has moved since the last call (and
  on the first call), it pushes the trainer's current weights into the
  engine's target (:meth:`adaspec.engine.Engine.update_weights`; int8:
  re-quantized with the initial calibration), so every rollout is sampled
  from the policy being trained;
- it samples each prompt's group with :func:`adaspec.rollout.rollout`
  (one shared prefill per prompt; the speculators draft from the group's
  other samples and from earlier steps' samples of the same prompt).

TRL hands the function its per-process prompt slice with each prompt
repeated ``num_generations`` times in a row (its ``RepeatSampler``); a run of
k equal prompts becomes one group of k samples, and a prompt given once gets
``trainer.num_generations`` samples. Conversational prompts (lists of
messages) go through the model's chat template.

Logprobs are the target's at temperature 1 without truncation (see
:mod:`adaspec.rollout`): use ``temperature=1.0`` and no ``top_k`` / ``top_p``
in ``GRPOConfig`` (TRL's defaults) so they are the sampling distribution's.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from adaspec.rollout import rollout
from adaspec.types import SamplingParams


class AdaspecRollouts:
    """A TRL ``rollout_func`` generating with ``engine``.

    Args:
        engine: the engine whose target is the policy (same architecture and
            tokenizer as the trainer's model).
        max_tokens: completion cap; default the trainer's ``max_completion_length``.
        mode: :func:`adaspec.rollout.rollout`'s mode ("sequential" or "batched").
        push_on_first_call: push the trainer's weights at the first call too
            (default True: the engine may have been loaded from another copy).

    Attributes:
        updates: ``(global_step, policy_version, seconds)`` per weight push.
        rollout_s: wall time of each call's generation.
    """

    def __init__(self, engine, max_tokens: Optional[int] = None, mode: str = "sequential",
                 push_on_first_call: bool = True) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.mode = mode
        self._last_step: Optional[int] = None if push_on_first_call else 0
        self.updates: list[tuple[int, int, float]] = []
        self.rollout_s: list[float] = []

    def push_weights(self, trainer) -> int:
        """Copy the trainer's current weights into the engine's target; returns the policy version."""
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        t0 = time.perf_counter()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        version = self.engine.update_weights(state)
        self.updates.append((int(trainer.state.global_step), version, time.perf_counter() - t0))
        return version

    def __call__(self, prompts: Sequence[Any], trainer) -> dict[str, list]:
        step = int(trainer.state.global_step)
        if self._last_step != step:
            self.push_weights(trainer)
            self._last_step = step
        runs: list[tuple[Any, int]] = []  # (prompt, how many samples)
        for p in prompts:
            if runs and runs[-1][0] == p:
                runs[-1] = (p, runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        if all(k == 1 for _, k in runs):
            runs = [(p, int(getattr(trainer, "num_generations", 1))) for p, _ in runs]
        params = _params_of(trainer, self.max_tokens)
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        t0 = time.perf_counter()
        for p, k in runs:
            ids = self.engine.apply_chat_template(list(p)) if isinstance(p, list) else self.engine.encode_prompt(p)
            group = rollout(self.engine, [ids], n=k, params=params, mode=self.mode)[0]
            for s in group.samples:
                out["prompt_ids"].append(list(group.prompt_ids))
                out["completion_ids"].append(list(s.completion_ids))
                out["logprobs"].append(list(s.logprobs))
        self.rollout_s.append(time.perf_counter() - t0)
        return out


def _params_of(trainer, max_tokens: Optional[int]) -> SamplingParams:
    """Sampling settings from the trainer (``temperature``, ``top_p``, ``top_k``, ``max_completion_length``)."""
    args = getattr(trainer, "args", None)

    def get(name: str, default):
        v = getattr(trainer, name, None)
        if v is None and args is not None:
            v = getattr(args, name, None)
        return default if v is None else v

    return SamplingParams(temperature=float(get("temperature", 1.0)), top_p=float(get("top_p", 1.0)),
                          top_k=int(get("top_k", 0) or 0),
                          max_tokens=int(max_tokens or get("max_completion_length", 256)))
