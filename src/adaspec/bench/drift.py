"""`adaspec bench drift`: a request stream whose workload shifts, every system side by side.

The stream is a list of phases (default python -> rust -> chat -> sql ->
tools, from the shared prompt sets; any JSONL of prompts can be a phase as
``name=path.jsonl``), each a seeded sample of ``phase_length`` prompts, every
prompt rendered with the model's chat template. Each request of the stream is
run by every system, interleaved, in an order rotated per request, so slow
spells of the shared machine hit all systems alike; learning systems are built
empty and one instance of each persists across the whole stream. Every
system's greedy output is compared token by token with plain decoding's.

Systems are a registry of factories ``factory(target, options) -> BenchSystem``
(:func:`register_system` adds one):

- ``plain``: this engine, no speculator;
- ``hf-plain`` / ``hf-prompt-lookup``: transformers ``model.generate()`` on the
  same weights, plain and with ``prompt_lookup_num_tokens`` (default 10);
- ``ngram``: prompt lookup in this engine (no learned state);
- ``suffix``: the adaptive suffix speculator only (learns across requests);
- ``static``: the draft head only (``adaspec.speculators.draft_head``) under
  the confidence-aware controller, which drafts with it only where its
  estimates say it pays (``adaspec generate --speculator static``; before
  issue 15, the head at a fixed k), skipped when the model has no checkpoint;
- ``atlas``: the confidence-aware controller
  (``adaspec.controller.ConfidenceAwareController``) over the static and an
  empty suffix speculator, built by :func:`adaspec.config.build_controller`
  exactly as ``adaspec generate --speculator atlas`` builds it;
- ``atlas-learn``: ``atlas`` with online learning (``--online-learning``):
  the learned head, fine-tuned by a background trainer process on this
  system's own requests, is a third candidate of the controller;
- ``learned``: the learned head alone under the controller, starting from the
  static head's weights;
- ``static-fixed`` / ``learned-fixed``: the static / learned head drafting
  ``--lookahead`` tokens at every step (no controller): the heads' own
  acceptance on the same requests;
- ``atlas-tree``: the same controller in tree mode (one token tree per
  step; :func:`adaspec.config.build_controller` with ``atlas-tree``), not in
  the default list;
- ``nothing`` / ``random`` / ``atlas-random``: speed-floor systems that never
  pay (FAULT_CASES.md F15; see ``_floor_factory``), not in the default list;
- ``vllm-plain`` / ``vllm-ngram`` / ``vllm-suffix`` / ``vllm-adaspec-suffix`` /
  ``vllm-adaspec-atlas``: vLLM's CPU engine (float32) on the same model folder,
  plain, with its own n-gram and suffix methods, and with adaspec's suffix and
  atlas proposers in its ``custom_class`` hook; run in vLLM's own environment
  (``make vllm``, :mod:`adaspec.integrations.vllm_client`), listed only where
  that exists (and, for ``vllm-suffix``, ``arctic_inference`` imports in it);
  otherwise skipped with the reason printed. Only with ``--dtype float32``.

Outputs (in ``out_dir``): ``drift.jsonl`` (one :class:`RequestRecord` per
system and request, written as the run goes), ``summary.md``, ``drift.png``,
``run.json`` (settings and machine); the summary's definitions are in
:mod:`adaspec.bench.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from adaspec import config
from adaspec.bench.common import hf_generate
from adaspec.prompts import DOMAINS, BenchPrompt, load_domain, load_jsonl_prompts
from adaspec.bench.report import RequestRecord, is_peer, load_records, print_summary, write_report
from adaspec.engine import Engine
from adaspec.speculators import NgramSpeculator, SuffixSpeculator
from adaspec.target import TargetModel
from adaspec.types import SamplingParams, SpeculationStats, common_prefix_len

DEFAULT_PHASES = ("python", "rust", "chat", "sql", "tools")  # "noise" is opt-in (the speed-floor check)
DEFAULT_SYSTEMS = ("plain", "hf-plain", "hf-prompt-lookup", "ngram", "suffix", "static", "atlas",
                   "vllm-plain", "vllm-ngram", "vllm-suffix", "vllm-adaspec-suffix",
                   "vllm-adaspec-atlas")  # vllm-* skipped, with the reason, where unavailable
DEFAULT_PHASE_LENGTH = 20
DEFAULT_MAX_TOKENS = 64
DEFAULT_LOOKAHEAD = config.DEFAULT_LOOKAHEAD
DEFAULT_PROMPT_LOOKUP_TOKENS = 10
DEFAULT_OUT = "bench_results/drift"
PLAIN = "plain"


# --------------------------------------------------------------- phases
@dataclass
class Phase:
    """One stretch of the stream with one workload.

    Attributes:
        name: label in tables and the figure ("sql", or a JSONL phase's name).
        prompts: the sampled prompts, in stream order.
        source: a domain of :mod:`adaspec.prompts` or a JSONL path.
    """

    name: str
    prompts: list[BenchPrompt]
    source: str


def parse_phase_spec(spec: str) -> tuple[str, str]:
    """``"sql"`` -> ("sql", "sql"); ``"mine=path.jsonl"`` -> ("mine", "path.jsonl").

    Raises:
        ValueError: an empty name or path, or an unknown domain.
    """
    spec = spec.strip()
    if "=" in spec:
        name, path = (s.strip() for s in spec.split("=", 1))
        if not name or not path:
            raise ValueError(f"phase {spec!r}: expected name=path.jsonl")
        return name, path
    if spec not in DOMAINS:
        raise ValueError(f"unknown phase {spec!r}; choose from {', '.join(DOMAINS)} or give name=path.jsonl")
    return spec, spec


def build_phases(
    specs: Sequence[str],
    length: int,
    seed: int = 0,
    root: Optional[Path] = None,
    fits: Optional[Callable[[BenchPrompt], bool]] = None,
) -> list[Phase]:
    """Sample ``length`` distinct prompts per phase, seeded.

    Each phase shuffles its source with ``random.Random(f"{seed}:{i}:{name}")``
    (i = the phase's position) and keeps the first ``length`` prompts that
    ``fits`` accepts (e.g. prompt + max_tokens inside the context window), so a
    phase never repeats a prompt and the same seed gives the same stream.

    Args:
        specs: domains (see ``adaspec.prompts.DOMAINS``) or ``name=path.jsonl``.
        length: prompts per phase (>= 1).
        seed: sampling seed.
        root: the prompt data folder (default: ``prompts_root()``).
        fits: filter on candidate prompts (default: keep all).

    Raises:
        ValueError: unknown domain, ``length < 1``, or a source with fewer than
            ``length`` usable prompts.
    """
    if length < 1:
        raise ValueError(f"phase length must be >= 1, got {length}")
    phases = []
    for i, spec in enumerate(specs):
        name, source = parse_phase_spec(spec)
        pool = load_domain(source, root) if source in DOMAINS else load_jsonl_prompts(source, name)
        order = list(range(len(pool)))
        random.Random(f"{seed}:{i}:{name}").shuffle(order)
        picked: list[BenchPrompt] = []
        for j in order:
            if fits is None or fits(pool[j]):
                picked.append(pool[j])
                if len(picked) == length:
                    break
        if len(picked) < length:
            raise ValueError(f"phase {name!r}: {len(picked)} usable prompts in {source}, need {length}")
        phases.append(Phase(name, picked, source))
    return phases


@dataclass
class StreamRequest:
    """One request of the stream, tokenized.

    Attributes:
        request_index / phase_index / index_in_phase: positions (0-based).
        phase: the phase's name.
        prompt_id: the prompt set's id.
        prompt_ids: the prompt after the chat template, length T.
    """

    request_index: int
    phase_index: int
    index_in_phase: int
    phase: str
    prompt_id: str
    prompt_ids: list[int]


def build_stream(target: TargetModel, phases: Sequence[Phase], samples: int = 1) -> list[StreamRequest]:
    """Concatenate the phases; every prompt goes through the model's chat template.

    With ``samples > 1`` each prompt is requested that many times in a row
    (group sampling, as RL rollouts do); each sample is its own request (its
    own index, hence its own seed when sampling).
    """
    if samples < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {samples}")
    templ = Engine(target)
    out: list[StreamRequest] = []
    for pi, ph in enumerate(phases):
        for j, p in enumerate(ph.prompts):
            ids = templ.apply_chat_template(p.messages)
            for _ in range(samples):
                out.append(StreamRequest(len(out), pi, j, ph.name, p.prompt_id, list(ids)))
    return out


# --------------------------------------------------------------- systems
@dataclass
class SystemOptions:
    """Settings every system factory receives.

    Attributes:
        lookahead: k for this engine's speculative systems. Default 8.
        prompt_lookup_tokens: transformers' ``prompt_lookup_num_tokens`` and
            vLLM's n-gram ``num_speculative_tokens``. Default 10.
        atlas_lookahead: the most draft tokens the controller may choose per
            step (as ``adaspec generate --speculator atlas``; the ``static``
            system runs under the controller too). Default 16.
    """

    lookahead: int = DEFAULT_LOOKAHEAD
    prompt_lookup_tokens: int = DEFAULT_PROMPT_LOOKUP_TOKENS
    atlas_lookahead: int = config.ATLAS_LOOKAHEAD


@dataclass
class SystemOutput:
    """One request's result from one system.

    Attributes:
        token_ids: generated token ids (EOS that ended the request included).
        seconds: wall time of the request, prefill included.
        stats: speculation counters, or None when the system does not report
            them (transformers, vLLM).
        controller_seconds: the controller's own time in this request
            (decisions, estimates; drafting excluded), for systems with one.
    """

    token_ids: list[int]
    seconds: float
    stats: Optional[SpeculationStats] = None
    controller_seconds: Optional[float] = None


class BenchSystem(Protocol):
    """A way to run one request: ``run(prompt_ids, params) -> SystemOutput``."""

    name: str

    def run(self, prompt_ids: list[int], params: SamplingParams) -> SystemOutput: ...


SystemFactory = Callable[[TargetModel, SystemOptions], BenchSystem]


class SystemUnavailable(RuntimeError):
    """Raised by a factory when its system cannot run here; the run skips it and prints why."""


class EngineSystem:
    """This engine with a fixed set of speculators (and controller); state persists across requests."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine

    def _controller_s(self) -> Optional[float]:
        return getattr(self.engine.controller, "decision_time_s", None)

    def run(self, prompt_ids: list[int], params: SamplingParams) -> SystemOutput:
        c0 = self._controller_s()
        t0 = time.perf_counter()
        r = self.engine.generate(prompt_ids, params)
        out = SystemOutput(r.token_ids, time.perf_counter() - t0, r.speculation)
        if c0 is not None:
            out.controller_seconds = self._controller_s() - c0
        return out


class HFSystem:
    """transformers ``model.generate()`` on the target's weights (``lookup`` = prompt_lookup_num_tokens)."""

    def __init__(self, name: str, target: TargetModel, lookup: int) -> None:
        self.name = name
        self.target = target
        self.lookup = lookup

    def run(self, prompt_ids: list[int], params: SamplingParams) -> SystemOutput:
        t0 = time.perf_counter()
        ids = hf_generate(self.target, prompt_ids, params.max_tokens, self.lookup, params.temperature, params.seed)
        return SystemOutput(ids, time.perf_counter() - t0)


class VllmSystem:
    """vLLM's CPU engine (float32) on the target's model folder, in vLLM's own environment.

    Runs :class:`adaspec.integrations.vllm_client.VllmWorker` (a child process
    under ``.venv-vllm``, see ``make vllm``), one request at a time like every
    other system; the time is ``LLM.generate``'s, measured inside that process.
    Learned state (vLLM's suffix method, adaspec's proposers) starts empty and
    persists across the run's requests.

    Args:
        method: a :data:`adaspec.integrations.vllm_runner.METHODS` name.
        k: speculative tokens per step.

    Raises:
        SystemUnavailable: the target is not float32 (vLLM's CPU build would
            not run the same precision), or vLLM's engine did not start.
    """

    def __init__(self, name: str, target: TargetModel, method: str, k: int) -> None:
        if target.dtype != "float32":
            raise SystemUnavailable(f"vLLM runs float32 here and the target is {target.dtype}: not the same precision")
        import atexit

        import torch

        from adaspec.integrations.vllm_client import VllmUnavailable, VllmWorker
        from adaspec.models import resolve_model

        self.name = name
        try:
            self.worker = VllmWorker(resolve_model(target.name), method, k=k, max_model_len=target.max_model_len,
                                     threads=torch.get_num_threads())
        except VllmUnavailable as e:
            raise SystemUnavailable(str(e)) from e
        atexit.register(self.worker.close)

    def run(self, prompt_ids: list[int], params: SamplingParams) -> SystemOutput:
        r = self.worker.generate([prompt_ids], params.max_tokens, params.temperature, params.seed)
        return SystemOutput(r["outputs"][0]["token_ids"], r["seconds"])


def _engine(name: str, *speculators) -> Callable[[TargetModel, SystemOptions], BenchSystem]:
    def factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
        return EngineSystem(name, Engine(target, [make() for make in speculators], lookahead=opts.lookahead))
    return factory


SYSTEMS: dict[str, SystemFactory] = {
    "plain": _engine("plain"),
    "hf-plain": lambda target, opts: HFSystem("hf-plain", target, 0),
    "hf-prompt-lookup": lambda target, opts: HFSystem("hf-prompt-lookup", target, opts.prompt_lookup_tokens),
    "ngram": _engine("ngram", NgramSpeculator),
    "suffix": _engine("suffix", SuffixSpeculator),
}


def register_system(name: str, factory: SystemFactory) -> None:
    """Add (or replace) a system: ``factory(target, options)`` returns an object with
    ``name`` and ``run(prompt_ids, params) -> SystemOutput``, built with empty learned state."""
    SYSTEMS[name] = factory


def _static_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # What `adaspec generate --speculator static` runs: the draft head alone under the
    # confidence-aware controller (its estimates decide k and when not to draft).
    try:
        controller = config.build_controller(
            config.EngineConfig(model=target.name, speculator="static", lookahead=opts.atlas_lookahead), target)
    except ValueError as e:  # no checkpoint for this model, or one that does not fit it
        raise SystemUnavailable(f"no draft head for {target.name}: {e}") from e
    return EngineSystem("static", Engine(target, controller=controller))


def _atlas_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # Exactly what `adaspec generate --speculator atlas` runs: the controller
    # over the static speculator (when the model has one) and an empty suffix
    # speculator, its cost model calibrated on this machine.
    controller = config.build_controller(
        config.EngineConfig(model=target.name, speculator="atlas", lookahead=opts.atlas_lookahead), target)
    if controller.static is None:
        print("system atlas: no static speculator for this model; the controller has the adaptive one only")
    return EngineSystem("atlas", Engine(target, controller=controller))


def _atlas_tree_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # What `adaspec generate --speculator atlas-tree` runs: atlas in tree mode
    # (suffix speculation trees, prompt lookup's matches, the draft head's dynamic tree).
    controller = config.build_controller(
        config.EngineConfig(model=target.name, speculator="atlas-tree", lookahead=opts.atlas_lookahead), target)
    return EngineSystem("atlas-tree", Engine(target, controller=controller))


def _floor_factory(name: str) -> SystemFactory:
    """Speed-floor systems (FAULT_CASES.md F15): speculators that never pay.

    - ``nothing``: a speculator that proposes nothing, at the fixed lookahead;
    - ``random``: random-token drafts at the fixed lookahead (no controller);
    - ``atlas-random``: the controller over a random-token "static" speculator
      (claiming 0.9 confidence) and an empty suffix speculator; it should learn
      to stop drafting with the random one.
    """
    def factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
        from adaspec.bench.baselines import NothingSpeculator, RandomTokenSpeculator

        if name == "nothing":
            return EngineSystem(name, Engine(target, [NothingSpeculator()], lookahead=opts.lookahead))
        if name == "random":
            return EngineSystem(name, Engine(target, [RandomTokenSpeculator(target.vocab_size)],
                                             lookahead=opts.lookahead))
        from adaspec.controller import ConfidenceAwareController

        atlas = ConfidenceAwareController(static=RandomTokenSpeculator(target.vocab_size), adaptive=SuffixSpeculator(),
                                          cost_model=config.calibrated_cost_model(target),
                                          max_lookahead=opts.atlas_lookahead)
        return EngineSystem(name, Engine(target, controller=atlas))
    return factory


SYSTEMS.update({name: _floor_factory(name) for name in ("nothing", "random", "atlas-random")})
def _atlas_learn_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # What `adaspec generate --speculator atlas --online-learning` runs: atlas plus the
    # learned head, trained by a background process on this system's own requests.
    try:
        controller = config.build_controller(config.EngineConfig(
            model=target.name, speculator="atlas", lookahead=opts.atlas_lookahead, online_learning=True), target)
    except ValueError as e:
        raise SystemUnavailable(str(e)) from e
    return _closing(EngineSystem("atlas-learn", Engine(target, controller=controller)))


def _learned_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # The learned head alone under the controller: it starts as the static head's weights
    # and is fine-tuned online on this system's own requests.
    from adaspec.controller import ConfidenceAwareController

    learned = _learned_head_alone(target)
    controller = ConfidenceAwareController(learned=learned, cost_model=config.calibrated_cost_model(target),
                                           max_lookahead=opts.atlas_lookahead)
    config.connect_learned(learned, controller)
    return _closing(EngineSystem("learned", Engine(target, controller=controller)))


def _static_fixed_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # The static head drafting k = --lookahead tokens every step: measures the head itself.
    from adaspec.controller import FixedController
    from adaspec.speculators.draft_head import load_static_speculator

    try:
        spec = load_static_speculator(target)
    except (FileNotFoundError, ValueError) as e:
        raise SystemUnavailable(f"no draft head for {target.name}: {e}") from e
    return EngineSystem("static-fixed", Engine(target, controller=FixedController(spec, opts.lookahead)))


def _learned_fixed_factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
    # The learned head drafting k = --lookahead tokens every step, fine-tuned online on
    # this system's requests (it starts as the static head): compare with static-fixed.
    from adaspec.controller import FixedController

    learned = _learned_head_alone(target)
    return _closing(EngineSystem("learned-fixed", Engine(target, controller=FixedController(learned, opts.lookahead))))


def _learned_head_alone(target: TargetModel):
    """A learned head that drafts with the static head's weights until its first version, training online."""
    try:
        return config.learned_speculator(config.EngineConfig(model=target.name), target,
                                         draft_before_first_version=True)
    except ValueError as e:
        raise SystemUnavailable(str(e)) from e


def _closing(system: EngineSystem) -> EngineSystem:
    """Stop the system's background work (the online trainer) when the benchmark process exits."""
    import atexit

    atexit.register(system.engine.close)
    return system


SYSTEMS.update({"static": _static_factory, "atlas": _atlas_factory, "atlas-tree": _atlas_tree_factory,
                "atlas-learn": _atlas_learn_factory, "learned": _learned_factory,
                "static-fixed": _static_fixed_factory, "learned-fixed": _learned_fixed_factory})


def _vllm_factory(name: str, method: str) -> SystemFactory:
    def factory(target: TargetModel, opts: SystemOptions) -> BenchSystem:
        # vLLM's n-gram method gets transformers' prompt-lookup budget, the others this engine's k.
        return VllmSystem(name, target, method, opts.prompt_lookup_tokens if method == "ngram" else opts.lookahead)
    return factory


def _vllm_probe(module: Optional[str] = None) -> Optional[str]:
    """None when vLLM's environment exists (and ``module`` imports there); else the reason."""
    import subprocess

    from adaspec.integrations.vllm_client import VllmUnavailable, find_vllm_python

    try:
        py = find_vllm_python()
    except VllmUnavailable as e:
        return str(e)
    if module:
        try:
            r = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot run {py}: {e}"
        if r.returncode:
            return f"{module} not importable in {py} ({(r.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


# name -> (probe returning None or why not, factory); listed only when the probe passes.
OPTIONAL_SYSTEMS: dict[str, tuple[Callable[[], Optional[str]], SystemFactory]] = {
    "vllm-plain": (_vllm_probe, _vllm_factory("vllm-plain", "plain")),
    "vllm-ngram": (_vllm_probe, _vllm_factory("vllm-ngram", "ngram")),
    "vllm-suffix": (lambda: _vllm_probe("arctic_inference"), _vllm_factory("vllm-suffix", "suffix")),
    "vllm-adaspec-suffix": (_vllm_probe, _vllm_factory("vllm-adaspec-suffix", "adaspec-suffix")),
    "vllm-adaspec-atlas": (_vllm_probe, _vllm_factory("vllm-adaspec-atlas", "adaspec-atlas")),
}


def available_systems(names: Optional[Sequence[str]] = None) -> tuple[dict[str, SystemFactory], dict[str, str]]:
    """(factories that can run here, {optional system: why it is not available}).

    Args:
        names: probe only these optional systems (a probe may start vLLM's
            Python); default all.
    """
    ok = dict(SYSTEMS)
    missing: dict[str, str] = {}
    for name, (probe, factory) in OPTIONAL_SYSTEMS.items():
        if name in ok or (names is not None and name not in names):
            continue
        why = probe()
        if why is None:
            ok[name] = factory
        else:
            missing[name] = why
    return ok, missing


def build_systems(target: TargetModel, names: Sequence[str], options: Optional[SystemOptions] = None,
                  log: Callable[[str], None] = print) -> list[BenchSystem]:
    """Build the named systems (fresh, empty learned state); skip unavailable ones, logging why.

    Raises:
        ValueError: a name that is neither registered nor optional, or a repeated name.
    """
    options = options or SystemOptions()
    ok, missing = available_systems(names)
    unknown = [n for n in names if n not in ok and n not in missing and n not in OPTIONAL_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {sorted(set(ok) | set(missing) | set(OPTIONAL_SYSTEMS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"systems repeated in {list(names)}")
    built: list[BenchSystem] = []
    for n in names:
        if n in missing:
            log(f"skipping system {n}: {missing[n]}")
            continue
        try:
            built.append(ok[n](target, options))
        except SystemUnavailable as e:
            log(f"skipping system {n}: {e}")
    return built


# --------------------------------------------------------------- the run
def _first_mismatch(got: Sequence[int], ref: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    n = common_prefix_len(got, ref)
    return None if n == len(got) == len(ref) else n


def make_record(req: StreamRequest, system: str, out: SystemOutput) -> RequestRecord:
    """A :class:`RequestRecord` from one system's output (matches_plain filled in later)."""
    n = len(out.token_ids)
    rec = RequestRecord(
        system=system, phase=req.phase, phase_index=req.phase_index, request_index=req.request_index,
        index_in_phase=req.index_in_phase, prompt_id=req.prompt_id, prompt_tokens=len(req.prompt_ids),
        tokens=n, seconds=out.seconds, tokens_per_s=n / out.seconds if out.seconds > 0 else 0.0,
    )
    s = out.stats
    if s is not None:
        # Undefined (None) for a request with no draft step / no proposed token.
        rec.mean_acceptance_length = s.mean_acceptance_length if s.draft_steps else None
        rec.acceptance_rate = s.acceptance_rate if s.proposed else None
        rec.draft_steps = s.draft_steps
        rec.emitted_on_draft_steps = s.emitted_on_draft_steps
        rec.proposed = s.proposed
        rec.accepted = s.accepted
        rec.target_forwards = s.target_forwards
        rec.steps_by_speculator = dict(s.steps_by_speculator)
        total = sum(s.steps_by_speculator.values())
        rec.speculator_shares = {k: v / total for k, v in s.steps_by_speculator.items()} if total else {}
        rec.lookahead_hist = {str(k): v for k, v in sorted(s.lookahead_hist.items())}
        rec.draft_seconds = s.draft_time_s
        rec.verify_seconds = s.verify_time_s
        if s.tree_steps:
            rec.tree_steps, rec.tree_nodes = s.tree_steps, s.tree_nodes
            rec.accepted_by_source = dict(s.accepted_by_source)
    rec.controller_seconds = out.controller_seconds
    return rec


def _warm_up(target: TargetModel, names: Sequence[str]) -> None:
    """First forwards allocate and pick kernels; pay that outside the stream.

    Uses throwaway stateless engines and a text from no prompt set, so no
    learning system sees anything before the stream.
    """
    ids = Engine(target).encode_prompt("one two three four five six seven eight one two three four five six")
    Engine(target).generate(ids, SamplingParams(max_tokens=8))
    Engine(target, [NgramSpeculator()], lookahead=DEFAULT_LOOKAHEAD).generate(ids, SamplingParams(max_tokens=8))
    if any(n.startswith("hf-") for n in names):
        hf_generate(target, ids, 8, 0)
        hf_generate(target, ids, 8, DEFAULT_PROMPT_LOOKUP_TOKENS)


def run_drift(
    target: TargetModel,
    phases: Sequence[Phase],
    systems: Sequence[str],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    out_dir: Optional[str | Path] = None,
    options: Optional[SystemOptions] = None,
    built: Optional[Sequence[BenchSystem]] = None,
    warm_up: bool = True,
    samples: int = 1,
) -> list[RequestRecord]:
    """Run the stream through every system, interleaved; returns one record per (system, request).

    Request i runs the systems in the order ``names[i % n:] + names[:i % n]``.
    With ``temperature == 0`` every system's output is compared with the
    ``plain`` system's (``matches_plain``; None when ``plain`` is not among the
    systems); with sampling each request gets seed ``seed * 1_000_003 + i``
    and nothing is compared.

    Args:
        target: the loaded target model.
        phases: from :func:`build_phases`.
        systems: registry names; unavailable optional ones are skipped with a
            printed reason.
        max_tokens: most new tokens per request.
        temperature: 0 for greedy.
        seed: sampling seed (the phases carry their own sampling seed).
        progress: show a tqdm bar.
        out_dir: if given, ``drift.jsonl`` there is started afresh and gets each
            request's records as soon as it finishes (a crashed run keeps what
            finished); call
            :func:`adaspec.bench.report.write_report` for the summary and figure.
        options: lookahead etc. for the factories.
        built: already built systems (tests inject these); overrides ``systems``.
        warm_up: run a few throwaway tokens first. Default True.
        samples: requests per prompt, one after another (group sampling). Default 1.

    Raises:
        ValueError: unknown system names, or no system left to run.
    """
    from tqdm import tqdm

    runners = list(built) if built is not None else build_systems(target, systems, options)
    if not runners:
        raise ValueError("no system to run")
    names = [s.name for s in runners]
    by_name = {s.name: s for s in runners}
    stream = build_stream(target, phases, samples)
    if warm_up:
        _warm_up(target, names)
    jsonl = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        jsonl = open(Path(out_dir) / "drift.jsonl", "w", encoding="utf-8")
    records: list[RequestRecord] = []
    bar = tqdm(stream, desc="bench drift", disable=not progress, unit="req", dynamic_ncols=True)
    try:
        for req in bar:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                    seed=seed * 1_000_003 + req.request_index if temperature > 0 else None)
            k = req.request_index % len(names)
            outs: dict[str, SystemOutput] = {}
            for name in names[k:] + names[:k]:
                outs[name] = by_name[name].run(req.prompt_ids, params)
            ref = outs.get(PLAIN) if temperature == 0 else None
            batch = []
            for name in names:  # records in a stable order, whatever the run order was
                rec = make_record(req, name, outs[name])
                if ref is not None and name != PLAIN:
                    rec.first_mismatch = _first_mismatch(outs[name].token_ids, ref.token_ids)
                    rec.matches_plain = rec.first_mismatch is None
                batch.append(rec)
            records += batch
            if jsonl is not None:
                for rec in batch:
                    jsonl.write(json.dumps(rec.to_dict()) + "\n")
                jsonl.flush()
            bar.set_postfix_str(f"{req.phase} " + " ".join(f"{r.system}={r.tokens_per_s:.0f}" for r in batch))
    finally:
        bar.close()
        if jsonl is not None:
            jsonl.close()
    return records


def machine_info() -> dict:
    """What the numbers were measured on (for ``run.json`` and the report header)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


# --------------------------------------------------------------- CLI glue
def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``adaspec bench drift`` (see :func:`drift_from_args`)."""
    config.add_model_arguments(parser)
    parser.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                        help="comma list of domains (%s) or name=path.jsonl entries, in stream order "
                             "(default: %%(default)s)" % ", ".join(DOMAINS))
    parser.add_argument("--phase", action="append", default=[], metavar="NAME=PATH.jsonl",
                        help="append a JSONL phase (lines with 'messages' or 'prompt'); repeatable")
    parser.add_argument("--phase-length", type=int, default=DEFAULT_PHASE_LENGTH,
                        help="requests per phase (default: %(default)s)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help="comma list; unavailable optional ones (static, atlas, vllm-*) are skipped "
                             "(default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="new tokens per request (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling and sampling seed (default: %(default)s)")
    parser.add_argument("--lookahead", type=int, default=DEFAULT_LOOKAHEAD, help="k for this engine (default: %(default)s)")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=DEFAULT_PROMPT_LOOKUP_TOKENS,
                        help="transformers prompt_lookup_num_tokens (default: %(default)s)")
    parser.add_argument("--skip", type=int, default=10,
                        help="requests per phase left out of the 'after' columns (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--from-jsonl", default=None, metavar="PATH",
                        help="only rebuild summary.md and drift.png from an earlier run's drift.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="requests per prompt, one after another, each with its own seed (group sampling, "
                             "as RL rollouts) (default: %(default)s)")


def _header(args: argparse.Namespace, info: dict) -> list[str]:
    return [
        f"model `{args.model}`, dtype {args.dtype}, phases {info['phases']}, {args.phase_length} requests per "
        f"phase, max_tokens {args.max_tokens}, temperature {args.temperature}, seed {args.seed}, "
        f"lookahead {args.lookahead}, prompt_lookup_num_tokens {args.prompt_lookup_tokens}",
        f"machine: {info['machine']['cpu']}, {info['machine']['cpu_count']} cores, "
        f"torch {info['machine']['torch']} ({info['machine']['torch_threads']} intra-op threads); "
        f"wall time {info.get('wall_s', 0) / 60:.1f} min",
        "arguments: `" + " ".join(shlex.quote(a) for a in info["argv"][1:]) + "`",
    ]


def drift_from_args(args: argparse.Namespace) -> int:
    """Run ``adaspec bench drift`` from parsed arguments; prints the summary and the output paths.

    Returns 0 (mismatches are reported in the summary, not as an exit code).

    Raises:
        ValueError: bad phases or systems.
    """
    if args.skip < 0:
        raise ValueError(f"--skip must be >= 0, got {args.skip}")
    out = Path(args.out)
    if args.from_jsonl:
        records = load_records(args.from_jsonl)
        info_path = Path(args.from_jsonl).with_name("run.json")
        header = json.loads(info_path.read_text())["header"] if info_path.exists() else []
        summary, md, png = write_report(records, out, header, skip=args.skip)
        print_summary(summary)
        print(f"wrote {md} and {png}")
        return 0

    specs = [s for s in args.phases.split(",") if s.strip()] + list(args.phase)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    target = config.load_config_target(config.config_from_args(args), log=print)
    templ = Engine(target)

    def fits(p: BenchPrompt) -> bool:
        return len(templ.apply_chat_template(p.messages)) + args.max_tokens < target.max_model_len

    phases = build_phases(specs, args.phase_length, seed=args.seed, fits=fits)
    options = SystemOptions(lookahead=args.lookahead, prompt_lookup_tokens=args.prompt_lookup_tokens)
    built = build_systems(target, systems, options)
    info = {
        "argv": sys.argv, "model": args.model, "dtype": args.dtype, "phases": [p.name for p in phases],
        "phase_length": args.phase_length, "systems": [s.name for s in built], "requested_systems": systems,
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
        "samples_per_prompt": getattr(args, "samples_per_prompt", 1), "options": asdict(options), "machine": machine_info(),
    }
    print(f"bench drift: {len(phases)} phases x {args.phase_length} requests, systems {', '.join(info['systems'])}",
          flush=True)
    t0 = time.time()
    records = run_drift(target, phases, systems, max_tokens=args.max_tokens, temperature=args.temperature,
                        seed=args.seed, progress=not args.no_progress, out_dir=out, options=options, built=built,
                        samples=getattr(args, "samples_per_prompt", 1))
    info["wall_s"] = time.time() - t0
    info["header"] = _header(args, info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(info, indent=2))
    summary, md, png = write_report(records, out, info["header"], skip=args.skip)
    print_summary(summary)
    ours = [m for m in summary.mismatches if not is_peer(m.system)]
    peers = [m for m in summary.mismatches if is_peer(m.system)]
    if ours:
        print(f"EXACTNESS FAILURE: {len(ours)} requests of this engine's speculative systems differ from plain "
              f"decoding (see {md})")
    if peers:
        print(f"note: {len(peers)} outputs of other engines ({', '.join(sorted({m.system for m in peers}))}) "
              f"differ from this engine's plain decoding; expected on int8, see the note under the exactness "
              f"table in {md}")
    print(f"wrote {out / 'drift.jsonl'}, {md}, {png}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m adaspec.bench.drift``: the same as ``adaspec bench drift``."""
    p = argparse.ArgumentParser(prog="adaspec bench drift", description=__doc__.splitlines()[0])
    add_drift_arguments(p)
    return drift_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
