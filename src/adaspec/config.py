"""Typed engine settings with their defaults, and the one place that builds a running engine.

``cli``, ``server`` and ``bench`` all describe what they want as an
:class:`EngineConfig` and call :func:`build_engine` (or its parts); none of
them imports another (gpt-fast's habit: one loader, and generation code never
reads command-line arguments; vLLM's: one config object handed to every part).

Defaults are defined here once; ``--help`` texts, the server and the
benchmarks read them from here (a test checks they agree).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from adaspec.controller import ATLAS_MAX_LOOKAHEAD
from adaspec.models import DEFAULT_MODEL
from adaspec.target import DTYPES, RUNTIMES
from adaspec.threads import THREADS_AUTO
from adaspec.types import DEFAULT_TENANT

if TYPE_CHECKING:  # imported lazily at run time: torch and transformers take seconds
    from adaspec.controller import Controller, CostModel
    from adaspec.engine import Engine
    from adaspec.speculators.base import Speculator
    from adaspec.store import SnapshotStore
    from adaspec.target import TargetModel

SPECULATORS = ("none", "ngram", "suffix", "static", "atlas", "atlas-tree")
DEFAULT_DTYPE = "int8"  # the fastest exact path (batch-invariant int8, see adaspec.quant)
DEFAULT_SPECULATOR = "atlas"  # the confidence-aware controller over the static and the adaptive speculator
DEFAULT_LOOKAHEAD = 8  # k of a single named speculator
ATLAS_LOOKAHEAD = ATLAS_MAX_LOOKAHEAD  # the most draft tokens the controller may choose per step
# Verify-cost table the controller's cost model starts from: tokens fed per forward.
CALIBRATION_TOKENS_FED = (1, 2, 3, 5, 9, 13, 17)
# Rows fed per batched forward the cost model is measured at (continuous batching, past the table above).
CALIBRATION_BATCH_ROWS = (17, 32, 64, 128)


#: Speculators run by the confidence-aware controller, which picks k per step (up to the lookahead).
CONTROLLED = ("static", "atlas", "atlas-tree")


def default_lookahead(speculator: str) -> int:
    """k when none is given: :data:`ATLAS_LOOKAHEAD` where the controller picks k per step
    (:data:`CONTROLLED`), else 8."""
    return ATLAS_LOOKAHEAD if speculator in CONTROLLED else DEFAULT_LOOKAHEAD


@dataclass
class EngineConfig:
    """Everything that decides how an engine is built.

    Attributes:
        model: registry name (``adaspec models``), local HF folder or ``.gguf`` file.
        dtype: "int8" (batch-invariant quantized path) or "float32".
        speculator: one of :data:`SPECULATORS`; "none" decodes plainly;
            "atlas-tree" is atlas in tree mode (every step verifies one token
            tree merging the suffix speculator's continuations, prompt
            lookup's matches and the draft head's dynamic tree, sized by the
            controller from the measured cost curve; needs the lean core, on
            the transformers runtime it verifies chains).
        lookahead: most draft tokens per step; None for :func:`default_lookahead`.
        draft_model: with ``speculator="static"``: a small causal LM with the
            target's tokenizer, instead of the shipped draft head.
        max_model_len: context window; None for the model's (at most 8192).
        state_dir: folder of learned-state snapshots, or None.
        tenant: whose learned state a single request uses (CLI ``generate``).
        threads: torch intra-op threads: a count, or "auto" (see
            :func:`adaspec.threads.tune_threads`).
        runtime: the target's forward: "auto" (the lean C++ core,
            :mod:`adaspec.model`, where the architecture is supported, else
            transformers), "lean" or "transformers".
        calibrate: measure the verify cost at start-up for the controller
            (``atlas``; ~3 s); False starts from a flat cost model.
        online_learning: with ``atlas`` / ``atlas-tree``: add the learned head
            (:mod:`adaspec.online`), a copy of the static head that a background
            trainer process fine-tunes on each tenant's traffic and hot-swaps in,
            as a third candidate of the controller; its versions persist under
            ``<state_dir>/learned_head``. Default False.
    """

    model: str = DEFAULT_MODEL
    dtype: str = DEFAULT_DTYPE
    speculator: str = DEFAULT_SPECULATOR
    lookahead: Optional[int] = None
    draft_model: Optional[str] = None
    max_model_len: Optional[int] = None
    state_dir: Optional[str] = None
    tenant: str = DEFAULT_TENANT
    threads: int | str = THREADS_AUTO
    runtime: str = "auto"
    calibrate: bool = True
    online_learning: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.speculator not in SPECULATORS:
            raise ValueError(f"unknown speculator {self.speculator!r}; choose from {', '.join(SPECULATORS)}")
        if self.lookahead is not None and (not isinstance(self.lookahead, int) or self.lookahead < 0):
            raise ValueError(f"lookahead must be an integer >= 0, got {self.lookahead!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.draft_model and self.speculator != "static":
            raise ValueError("--draft-model needs --speculator static")
        if self.online_learning and self.speculator not in ("atlas", "atlas-tree"):
            raise ValueError(f"--online-learning needs --speculator atlas or atlas-tree, got {self.speculator!r}")
        from adaspec.threads import parse_threads

        parse_threads(self.threads)

    @property
    def effective_lookahead(self) -> int:
        return default_lookahead(self.speculator) if self.lookahead is None else self.lookahead


# --------------------------------------------------------------------------- CLI arguments
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--max-model-len``, ``--threads``: what loads the target."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF folder or .gguf (default: %(default)s)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES),
                   help="target precision; int8 is the batch-invariant quantized path (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's, <= 8192)")
    p.add_argument("--runtime", default="auto", choices=list(RUNTIMES),
                   help="target forward: auto = the lean C++ core where the architecture is supported, else "
                        "transformers (default: %(default)s)")
    add_threads_argument(p)


def add_threads_argument(p: argparse.ArgumentParser, default: int | str = THREADS_AUTO) -> None:
    p.add_argument("--threads", default=default,
                   help="torch intra-op threads: a number, or 'auto' (one thread per core when that measures "
                        "faster at start-up, else one; never slower than one thread on a busy machine) "
                        "(default: %(default)s)")


def add_speculator_arguments(p: argparse.ArgumentParser, state_help: str) -> None:
    """``--speculator``, ``--lookahead``, ``--draft-model``, ``--state-dir``."""
    p.add_argument("--speculator", default=DEFAULT_SPECULATOR, choices=SPECULATORS,
                   help="draft proposer; none decodes plainly; static is the draft head (or --draft-model) "
                        "under the confidence-aware controller, which drafts only where it pays; atlas is that "
                        "controller over the static and the adaptive speculator; atlas-tree verifies one token "
                        "tree per step merging every speculator's candidates (lean core; chains on the "
                        "transformers runtime) (default: %(default)s)")
    p.add_argument("--lookahead", type=int, default=None,
                   help=f"most draft tokens per step, k (default: {DEFAULT_LOOKAHEAD}; {ATLAS_LOOKAHEAD} for static, "
                        "atlas and atlas-tree, whose controller picks k per step)")
    p.add_argument("--draft-model", default=None,
                   help="with --speculator static: a smaller causal LM with the target's tokenizer instead of the "
                        "draft head")
    p.add_argument("--state-dir", default=None, help=state_help)
    p.add_argument("--online-learning", action="store_true",
                   help="with atlas / atlas-tree: a learned draft head, fine-tuned on each tenant's traffic by a "
                        "background trainer process (lowest CPU priority, one thread) and hot-swapped in as a "
                        "third candidate beside the static and adaptive speculators; its versions persist under "
                        "STATE_DIR/learned_head")


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """An :class:`EngineConfig` from parsed arguments (missing ones keep their defaults).

    Raises:
        ValueError: an invalid setting.
    """
    cfg = EngineConfig()
    for name in ("model", "dtype", "speculator", "lookahead", "draft_model", "max_model_len", "state_dir",
                 "tenant", "threads", "runtime", "online_learning"):
        if hasattr(args, name):
            setattr(cfg, name, getattr(args, name))
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- building
def load_config_target(cfg: EngineConfig, log: Callable[[str], None] | None = None) -> "TargetModel":
    """Set the threads and load the target model ``cfg`` names.

    Raises:
        ValueError: unknown model or dtype.
    """
    from adaspec.target import load_target
    from adaspec.threads import apply_threads, cpu_sample, tune_threads

    apply_threads(cfg.threads, log=log)
    since = cpu_sample()  # how busy the machine is while the target loads: --threads auto's check
    target = load_target(cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len, runtime=cfg.runtime)
    tune_threads(target, cfg.threads, log=log, since=since)
    return target


def calibrated_cost_model(target: "TargetModel") -> "CostModel":
    """The controller's cost model, seeded with verify times measured on ``target``.

    Measured once per model, machine, build and thread count and kept on disk
    (:mod:`adaspec.cost_cache`; 3 to 30 s of forwards, by how fast the CPU's
    int8 multiply-adds are), and kept on the target, so every controller built
    for it (e.g. chain and tree mode side by side in a benchmark) starts from
    the same curve; each gets its own :class:`CostModel`, whose scale then
    follows its own forwards.
    """
    from adaspec import cost_cache
    from adaspec.controller import CostModel

    table = getattr(target, "_adaspec_verify_ms_table", None)
    batch = getattr(target, "_adaspec_batch_ms_table", None)
    batched = hasattr(target, "forward_batch")
    if table is None:
        what = {"tokens_fed": list(CALIBRATION_TOKENS_FED), "batch_rows": list(CALIBRATION_BATCH_ROWS) if batched
                else None, "repeats": 3, "prompt_len": 32}
        key = cost_cache.cache_key(target, what)
        stored = cost_cache.load(key)
        if stored is not None and (stored["batch_ms"] or not batched):
            table, batch = stored["verify_ms"], stored["batch_ms"]
        else:
            from adaspec.step_cost import measure_batch_cost, measure_step_cost

            table = measure_step_cost(target, ks=CALIBRATION_TOKENS_FED, repeats=3, prompt_len=32)
            if batched:  # continuous batching: the cost of one batched forward by rows fed, past the table above
                batch = measure_batch_cost(target, rows=CALIBRATION_BATCH_ROWS, repeats=3, prompt_len=32)
            cost_cache.save(key, table, batch)
        try:
            target._adaspec_verify_ms_table = dict(table)
            if batch:
                target._adaspec_batch_ms_table = dict(batch)
        except AttributeError:  # a target that takes no attributes: read (or measure) again next time
            pass
    elif batch is None and batched:
        from adaspec.step_cost import measure_batch_cost

        batch = measure_batch_cost(target, rows=CALIBRATION_BATCH_ROWS, repeats=3, prompt_len=32)
        try:
            target._adaspec_batch_ms_table = dict(batch)
        except AttributeError:
            pass
    return CostModel(dict(table), batch_ms_table=dict(batch) if batch else None)


def static_speculator_or_none(target: "TargetModel") -> Optional["Speculator"]:
    """The shipped static speculator for ``target``, or None when there is none.

    A checkpoint that exists but does not fit the target is reported with a
    RuntimeWarning rather than silently dropped.
    """
    from adaspec.speculators.draft_head import load_static_speculator

    try:
        return load_static_speculator(target)
    except FileNotFoundError:
        return None  # no checkpoint shipped for this model
    except ValueError as e:
        warnings.warn(f"static speculator not used: {e}", RuntimeWarning, stacklevel=2)
        return None


def learned_speculator(cfg: EngineConfig, target: "TargetModel", draft_before_first_version: bool = False):
    """The learned head for ``target`` (:func:`adaspec.online.learned.load_learned_speculator`), training online.

    Raises:
        ValueError: the model has no static head to start from.
    """
    from adaspec.online.learned import load_learned_speculator

    try:
        return load_learned_speculator(target, state_dir=cfg.state_dir,
                                       draft_before_first_version=draft_before_first_version)
    except FileNotFoundError:
        raise ValueError(f"online learning starts from the static draft head, and {target.name} has none "
                         "(train one with `adaspec train-speculator`)") from None


def connect_learned(learned: Any, controller: "Controller") -> None:
    """On a rollback of ``learned``, re-prime the controller's estimates for it.

    A published version beat the one before it on held-out traffic, so the
    estimates carry over to it (a reset would make the controller relearn,
    with its prior, what it already knew); a rollback means the live estimates
    came from a worse version, so they start again.
    """
    def on_swap(tenant: str, version: int, info: dict) -> None:
        if info.get("rollback_from"):
            controller.reset_estimate(learned.name, tenant)

    learned.on_swap = on_swap


def build_controller(cfg: EngineConfig, target: "TargetModel") -> "Controller":
    """The controller (with its speculators) that ``cfg.speculator`` names.

    Raises:
        ValueError: unknown name, or ``static`` for a model without a static speculator.
    """
    from adaspec.controller import ConfidenceAwareController, CostModel, FixedController

    name, k = cfg.speculator, cfg.effective_lookahead
    if name in ("atlas", "atlas-tree"):
        from adaspec.speculators import NgramSpeculator
        from adaspec.speculators.suffix import SuffixSpeculator

        costs = calibrated_cost_model(target) if cfg.calibrate else CostModel()
        learned = learned_speculator(cfg, target) if cfg.online_learning else None
        if name == "atlas":
            controller = ConfidenceAwareController(static=static_speculator_or_none(target),
                                                   adaptive=SuffixSpeculator(), learned=learned, cost_model=costs,
                                                   max_lookahead=k)
        else:
            controller = ConfidenceAwareController(static=static_speculator_or_none(target),
                                                   adaptive=SuffixSpeculator(), learned=learned, cost_model=costs,
                                                   max_lookahead=k, tree=True, lookup=NgramSpeculator(),
                                                   max_tree_nodes=k)
        if learned is not None:
            connect_learned(learned, controller)
        return controller
    if name == "none":
        return FixedController(None, 0)
    if name == "ngram":
        from adaspec.speculators import NgramSpeculator

        return FixedController(NgramSpeculator(), k)
    if name == "suffix":
        from adaspec.speculators.suffix import SuffixSpeculator

        return FixedController(SuffixSpeculator(), k)
    if name == "static":
        # The static speculator alone under the confidence-aware controller: its own
        # estimates and confidence decide how far to draft, and when not to draft at all.
        if cfg.draft_model:
            from adaspec.speculators.draft_model import DraftModelSpeculator

            spec = DraftModelSpeculator.from_pretrained(cfg.draft_model, target)
        else:
            from adaspec.speculators.draft_head import load_static_speculator

            try:
                spec = load_static_speculator(target)
            except FileNotFoundError:
                raise ValueError("no static speculator is available for this model "
                                 "(train one with `adaspec train-speculator`, or give --draft-model)") from None
        costs = calibrated_cost_model(target) if cfg.calibrate else CostModel()
        return ConfidenceAwareController(static=spec, cost_model=costs, max_lookahead=k)
    raise ValueError(f"unknown speculator {name!r}; choose from {', '.join(SPECULATORS)}")


def build_engine(cfg: EngineConfig, target: Optional["TargetModel"] = None,
                 log: Callable[[str], None] | None = None) -> "Engine":
    """The engine ``cfg`` describes: target (loaded unless given), controller and speculators.

    Learned state is not loaded here: see :func:`restore_state`.

    Raises:
        ValueError: an invalid setting, unknown model or speculator.
    """
    from adaspec.engine import Engine

    cfg.validate()
    target = target if target is not None else load_config_target(cfg, log=log)
    engine = Engine(target, controller=build_controller(cfg, target))
    from adaspec.model.decoder import _trim_heap

    _trim_heap()  # loading leaves tens of MB of freed heap mapped (glibc)
    return engine


# --------------------------------------------------------------------------- learned state
def _warn(message: str) -> None:
    print(f"adaspec: warning: {message}", file=sys.stderr)


def restore_state(store: "SnapshotStore", engine: "Engine", log: Callable[[str], None] = _warn) -> list[str]:
    """Load every part's learned state from ``store`` into ``engine``.

    A corrupt or foreign snapshot is set aside by the store; one that does not
    fit a part is reported through ``log`` and that part starts empty.

    Returns:
        the names restored.
    """
    names = [engine.controller.name, *engine.speculators]
    parts = {}
    for name in names:
        try:
            state = store.load(name)
        except Exception as e:  # the store sets bad files aside; anything else must not stop start-up
            log(f"snapshot {name!r} not read ({type(e).__name__}: {e}); it starts empty")
            continue
        if state:
            parts[name] = state
    return engine.load_learned_state(parts, log=log)


def save_state(store: "SnapshotStore", engine: "Engine", log: Callable[[str], None] = _warn) -> list[str]:
    """Write every part's non-empty learned state to ``store`` (atomic per snapshot).

    Returns:
        the names written.
    """
    written = []
    for name, state in engine.learned_state().items():
        try:
            store.save(name, state)
            written.append(name)
        except Exception as e:
            log(f"snapshot {name!r} not written ({type(e).__name__}: {e})")
    return written


def open_store(state_dir: Optional[str]) -> Optional["SnapshotStore"]:
    """The snapshot store in ``state_dir`` (created if missing), or None."""
    if not state_dir:
        return None
    from adaspec.store import SnapshotStore

    return SnapshotStore(os.fspath(state_dir))


__all__ = [
    "ATLAS_LOOKAHEAD", "DEFAULT_DTYPE", "DEFAULT_LOOKAHEAD", "DEFAULT_MODEL", "DEFAULT_SPECULATOR", "DTYPES",
    "EngineConfig", "SPECULATORS", "THREADS_AUTO", "add_model_arguments", "add_speculator_arguments",
    "add_threads_argument", "build_controller", "build_engine", "calibrated_cost_model", "config_from_args",
    "default_lookahead", "load_config_target", "open_store", "restore_state", "save_state",
    "static_speculator_or_none",
]
