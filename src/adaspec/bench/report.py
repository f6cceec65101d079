"""Workload-drift benchmark results: per-request records, the summary arithmetic, the figure.

Pure Python over :class:`RequestRecord` lists (no model, no torch), so the
arithmetic is tested on synthetic records and a finished run's JSONL can be
summarized again (``load_records`` then ``write_report``).

Definitions used in every table (glossary in ``adaspec.types``):

- **tokens/s** of a set of requests = sum of generated tokens / sum of wall
  seconds (token-weighted; each request's seconds include its prefill).
- **speedup** = a system's tokens/s / plain decoding's tokens/s over the same
  requests (systems run the same prompts, interleaved, so the machine's noise
  hits all alike).
- **after the first N requests** (N = ``skip``, default 10): tokens/s over each
  phase's requests with ``index_in_phase >= N``.
- **mean acceptance length** = sum(tokens emitted on steps that had a draft) /
  sum(steps that had a draft), accepted plus the recovered or bonus token,
  pooled over the requests (not a mean of per-request means).
  **acceptance rate** = sum(accepted draft tokens) / sum(proposed draft tokens).
- **steady speed** of a system in a phase = the median per-request tokens/s
  over the phase's last half (requests with ``index_in_phase >= n // 2`` of the
  n it holds).
- **recovery** in a phase = the smallest r such that the mean per-request
  tokens/s over requests r .. r + window - 1 of the phase (window = 3, cut at
  the phase's end) is >= 90% of the steady speed; r is the number of requests
  the system served before it was back up to speed. For the first phase this
  is the cold start (learning systems start empty); for later phases it is the
  recovery after the shift. ``None`` (shown "not reached") if no such r.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

BASELINE = "plain"
DEFAULT_SKIP = 10
DEFAULT_RECOVERY_FRACTION = 0.9
DEFAULT_RECOVERY_WINDOW = 3
DEFAULT_BLOCK = 10
DEFAULT_PLOT_WINDOW = 5


@dataclass
class RequestRecord:
    """One system's run of one request of the stream (one JSONL line).

    Attributes:
        system: the system's registry name ("plain", "suffix", ...).
        phase: the phase's name ("sql", "tools", or a JSONL phase's name).
        phase_index: the phase's position in the stream (0-based).
        request_index: the request's position in the whole stream (0-based).
        index_in_phase: the request's position in its phase (0-based).
        prompt_id: the prompt set's id for the prompt.
        prompt_tokens: prompt length after the chat template.
        tokens: generated tokens (an EOS that ended the request included).
        seconds: wall time of the request (prefill included).
        tokens_per_s: ``tokens / seconds``.
        mean_acceptance_length: tokens emitted per target forward on steps
            that had a draft; None when the system does not report it.
        acceptance_rate: accepted / proposed draft tokens; None when not reported.
        draft_steps: target forwards that verified at least one draft token.
        emitted_on_draft_steps: tokens emitted on those forwards.
        proposed / accepted: draft tokens proposed / accepted.
        target_forwards: target forwards of the decode loop (prefill excluded).
        steps_by_speculator: target forwards per speculator ("none" = no draft).
        speculator_shares: ``steps_by_speculator`` as fractions of ``target_forwards``.
        lookahead_hist: draft tokens verified per step -> number of steps
            (keys are strings, as in JSON).
        draft_seconds: time spent proposing drafts, the controller's decisions
            included (None when the system does not report it).
        verify_seconds: time spent in verify forwards and acceptance (None
            when not reported).
        controller_seconds: the controller's own time (decisions, estimates,
            shadow judging; children's drafting excluded); None without one.
        matches_plain: greedy output identical to plain decoding's; None when
            not checked (the plain system itself, sampling, or no plain run).
        first_mismatch: index of the first differing token when
            ``matches_plain`` is False.
        tree_steps / tree_nodes: tree-mode steps and nodes verified over them
            (None for systems without trees).
        accepted_by_source: tree mode: accepted tokens by the speculator that proposed them.
    """

    system: str
    phase: str
    phase_index: int
    request_index: int
    index_in_phase: int
    prompt_id: str
    prompt_tokens: int
    tokens: int
    seconds: float
    tokens_per_s: float
    mean_acceptance_length: Optional[float] = None
    acceptance_rate: Optional[float] = None
    draft_steps: Optional[int] = None
    emitted_on_draft_steps: Optional[int] = None
    proposed: Optional[int] = None
    accepted: Optional[int] = None
    target_forwards: Optional[int] = None
    steps_by_speculator: dict[str, int] = field(default_factory=dict)
    speculator_shares: dict[str, float] = field(default_factory=dict)
    lookahead_hist: dict[str, int] = field(default_factory=dict)
    draft_seconds: Optional[float] = None
    verify_seconds: Optional[float] = None
    controller_seconds: Optional[float] = None
    matches_plain: Optional[bool] = None
    first_mismatch: Optional[int] = None
    tree_steps: Optional[int] = None
    tree_nodes: Optional[int] = None
    accepted_by_source: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer files)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))


def write_jsonl(records: Sequence[RequestRecord], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")


def load_records(path: str | Path) -> list[RequestRecord]:
    """Records from a drift JSONL file (one :class:`RequestRecord` per line)."""
    with open(path, encoding="utf-8") as f:
        return [RequestRecord.from_dict(json.loads(line)) for line in f if line.strip()]


# --------------------------------------------------------------- arithmetic
def tokens_per_s(records: Sequence[RequestRecord]) -> Optional[float]:
    """Sum of tokens / sum of seconds; None for no records."""
    secs = sum(r.seconds for r in records)
    if not records or secs <= 0:
        return None
    return sum(r.tokens for r in records) / secs


def mean_acceptance_length(records: Sequence[RequestRecord]) -> Optional[float]:
    """Pooled mean acceptance length = sum(emitted_on_draft_steps) / sum(draft_steps).

    None when no record reports it or no step had a draft.
    """
    rs = [r for r in records if r.draft_steps is not None]
    steps = sum(r.draft_steps or 0 for r in rs)
    if not rs or steps == 0:
        return None
    return sum(r.emitted_on_draft_steps or 0 for r in rs) / steps


def acceptance_rate(records: Sequence[RequestRecord]) -> Optional[float]:
    """Pooled acceptance rate = sum(accepted) / sum(proposed); None when nothing was proposed."""
    proposed = sum(r.proposed or 0 for r in records)
    if proposed == 0:
        return None
    return sum(r.accepted or 0 for r in records) / proposed


def steady_tokens_per_s(phase_records: Sequence[RequestRecord]) -> Optional[float]:
    """Median per-request tokens/s over the phase's last half (``index_in_phase >= n // 2``)."""
    if not phase_records:
        return None
    n = len(phase_records)
    tail = [r.tokens_per_s for r in phase_records if r.index_in_phase >= n // 2]
    return statistics.median(tail) if tail else None


def recovery_requests(
    phase_records: Sequence[RequestRecord],
    fraction: float = DEFAULT_RECOVERY_FRACTION,
    window: int = DEFAULT_RECOVERY_WINDOW,
) -> Optional[int]:
    """Requests served in a phase before the system is back to ``fraction`` of its steady speed.

    The smallest r such that the mean per-request tokens/s over requests
    ``r .. r + window - 1`` (cut at the phase's end) is at least
    ``fraction * steady_tokens_per_s``. None if no r qualifies.

    Args:
        phase_records: one system's records of one phase (any order).
        fraction: share of the steady speed that counts as recovered. Default 0.9.
        window: requests averaged, to damp per-prompt noise (>= 1). Default 3.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    rs = sorted(phase_records, key=lambda r: r.index_in_phase)
    steady = steady_tokens_per_s(rs)
    if steady is None:
        return None
    speeds = [r.tokens_per_s for r in rs]
    for i in range(len(speeds)):
        chunk = speeds[i : i + window]
        if sum(chunk) / len(chunk) >= fraction * steady:
            return i
    return None


@dataclass
class Mismatch:
    """A request whose greedy output differs from plain decoding's."""

    system: str
    request_index: int
    phase: str
    prompt_id: str
    first_mismatch: Optional[int]


@dataclass
class Block:
    """Requests ``start .. start + size - 1`` of the stream: per-system tokens/s and mean acceptance length."""

    start: int
    size: int
    phases: list[str]
    tokens_per_s: dict[str, Optional[float]]
    mean_acceptance_length: dict[str, Optional[float]]


@dataclass
class DriftSummary:
    """Everything the tables show, keyed ``[system][phase]``.

    Attributes:
        systems / phases: in stream order.
        baseline: the system speedups are relative to ("plain").
        tokens_per_s: per phase, all requests; ``overall`` is the whole stream.
        speedup: ``overall`` tokens/s over plain's (None without a plain run).
        tokens_per_s_after_skip: per phase, requests with index_in_phase >= skip;
            ``overall_after_skip`` pools those requests over the stream.
        speedup_after_skip: ``overall_after_skip`` over plain's.
        tokens_per_s_last_half: per phase, requests with ``index_in_phase >= n // 2``.
        steady_tokens_per_s / recovery: see the module docstring.
        mean_acceptance_length / acceptance_rate: per phase and ``overall_mal``
            / ``overall_acceptance_rate``, pooled.
        draft_share: drafting time (speculators and controller) over drafting
            plus verify time, pooled over the stream; None when not reported.
        controller_share: the controller's own time over drafting plus verify
            time (part of ``draft_share``); None without a controller.
        speculator_shares: per phase, target forwards per speculator as fractions
            (``"none"`` = plain decoding steps).
        checked / matched: greedy requests compared with plain / identical.
        mismatches: every differing request.
        blocks: per block of ``block`` requests.
    """

    systems: list[str]
    phases: list[str]
    baseline: str
    skip: int
    fraction: float
    window: int
    block: int
    tokens_per_s: dict[str, dict[str, Optional[float]]]
    overall: dict[str, Optional[float]]
    speedup: dict[str, Optional[float]]
    tokens_per_s_after_skip: dict[str, dict[str, Optional[float]]]
    overall_after_skip: dict[str, Optional[float]]
    speedup_after_skip: dict[str, Optional[float]]
    tokens_per_s_last_half: dict[str, dict[str, Optional[float]]]
    steady_tokens_per_s: dict[str, dict[str, Optional[float]]]
    recovery: dict[str, dict[str, Optional[int]]]
    mean_acceptance_length: dict[str, dict[str, Optional[float]]]
    overall_mal: dict[str, Optional[float]]
    acceptance_rate: dict[str, dict[str, Optional[float]]]
    overall_acceptance_rate: dict[str, Optional[float]]
    draft_share: dict[str, Optional[float]]
    controller_share: dict[str, Optional[float]]
    speculator_shares: dict[str, dict[str, dict[str, float]]]
    checked: dict[str, int]
    matched: dict[str, int]
    mismatches: list[Mismatch]
    blocks: list[Block]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summarize(
    records: Sequence[RequestRecord],
    skip: int = DEFAULT_SKIP,
    fraction: float = DEFAULT_RECOVERY_FRACTION,
    window: int = DEFAULT_RECOVERY_WINDOW,
    block: int = DEFAULT_BLOCK,
    baseline: str = BASELINE,
) -> DriftSummary:
    """Compute every table's numbers from the per-request records (definitions: module docstring).

    Args:
        records: all systems' records of one run.
        skip: requests at the start of each phase left out of the "after" columns. Default 10.
        fraction / window: recovery threshold and averaging window. Defaults 0.9, 3.
        block: requests per row of the block table. Default 10.
        baseline: the system speedups are relative to. Default "plain".

    Raises:
        ValueError: ``block < 1``.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    systems = list(dict.fromkeys(r.system for r in records))
    phase_order = sorted({(r.phase_index, r.phase) for r in records})
    phases = list(dict.fromkeys(p for _, p in phase_order))
    by: dict[tuple[str, str], list[RequestRecord]] = {}
    for r in records:
        by.setdefault((r.system, r.phase), []).append(r)

    def per_phase(fn) -> dict[str, dict[str, Any]]:
        return {s: {p: fn(by.get((s, p), [])) for p in phases} for s in systems}

    tps = per_phase(tokens_per_s)
    after = per_phase(lambda rs: tokens_per_s([r for r in rs if r.index_in_phase >= skip]))
    overall = {s: tokens_per_s([r for r in records if r.system == s]) for s in systems}
    overall_after = {s: tokens_per_s([r for r in records if r.system == s and r.index_in_phase >= skip])
                     for s in systems}
    base, base_after = overall.get(baseline), overall_after.get(baseline)
    checked = {s: sum(1 for r in records if r.system == s and r.matches_plain is not None) for s in systems}
    matched = {s: sum(1 for r in records if r.system == s and r.matches_plain) for s in systems}
    mismatches = [Mismatch(r.system, r.request_index, r.phase, r.prompt_id, r.first_mismatch)
                  for r in sorted(records, key=lambda r: (r.request_index, r.system)) if r.matches_plain is False]

    blocks: list[Block] = []
    n_requests = max((r.request_index for r in records), default=-1) + 1
    for start in range(0, n_requests, block):
        rs = [r for r in records if start <= r.request_index < start + block]
        blocks.append(Block(
            start=start,
            size=min(block, n_requests - start),
            phases=list(dict.fromkeys(r.phase for r in sorted(rs, key=lambda r: r.request_index))),
            tokens_per_s={s: tokens_per_s([r for r in rs if r.system == s]) for s in systems},
            mean_acceptance_length={s: mean_acceptance_length([r for r in rs if r.system == s]) for s in systems},
        ))

    def time_share(rs: Sequence[RequestRecord], part: str) -> Optional[float]:
        """sum(part) / sum(draft + verify seconds) over the records that report ``part``."""
        rs = [r for r in rs if getattr(r, part) is not None and r.draft_seconds is not None
              and r.verify_seconds is not None]
        total = sum(r.draft_seconds + r.verify_seconds for r in rs)
        return sum(getattr(r, part) for r in rs) / total if total > 0 else None

    def shares(rs: Sequence[RequestRecord]) -> dict[str, float]:
        steps: dict[str, int] = {}
        for r in rs:
            for k, v in r.steps_by_speculator.items():
                steps[k] = steps.get(k, 0) + v
        total = sum(steps.values())
        return {k: v / total for k, v in sorted(steps.items())} if total else {}

    return DriftSummary(
        systems=systems, phases=phases, baseline=baseline, skip=skip, fraction=fraction, window=window, block=block,
        tokens_per_s=tps, overall=overall,
        speedup={s: _ratio(overall[s], base) for s in systems},
        tokens_per_s_after_skip=after, overall_after_skip=overall_after,
        speedup_after_skip={s: _ratio(overall_after[s], base_after) for s in systems},
        tokens_per_s_last_half=per_phase(lambda rs: tokens_per_s(
            [r for r in rs if r.index_in_phase >= len(rs) // 2])),
        steady_tokens_per_s=per_phase(steady_tokens_per_s),
        recovery=per_phase(lambda rs: recovery_requests(rs, fraction, window)),
        mean_acceptance_length=per_phase(mean_acceptance_length),
        overall_mal={s: mean_acceptance_length([r for r in records if r.system == s]) for s in systems},
        acceptance_rate=per_phase(acceptance_rate),
        overall_acceptance_rate={s: acceptance_rate([r for r in records if r.system == s]) for s in systems},
        draft_share={s: time_share([r for r in records if r.system == s], "draft_seconds") for s in systems},
        controller_share={s: time_share([r for r in records if r.system == s], "controller_seconds")
                          for s in systems},
        speculator_shares=per_phase(shares),
        checked=checked, matched=matched, mismatches=mismatches, blocks=blocks,
    )


# --------------------------------------------------------------- tables
@dataclass
class Table:
    """A rendered-agnostic table: Markdown and rich both draw from it."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def _mismatch_cell(ms: Sequence, shown: int = 5) -> str:
    """The first ``shown`` mismatching requests, whole, then how many more (drift.jsonl lists them all)."""
    if not ms:
        return "none"
    cell = ", ".join(f"#{m.request_index} ({m.phase} {m.prompt_id}, token {m.first_mismatch})" for m in ms[:shown])
    if len(ms) > shown:
        cell += f", and {len(ms) - shown} more (first_mismatch in drift.jsonl)"
    return cell


def _f(v: Optional[float], digits: int = 1, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def _with_ratio(v: Optional[float], base: Optional[float]) -> str:
    """``"12.3 (1.50x)"``: a tokens/s value and its ratio to the baseline's."""
    r = _ratio(v, base)
    return _f(v) if r is None else f"{_f(v)} ({r:.2f}x)"


def summary_tables(s: DriftSummary) -> list[Table]:
    """The summary as tables: speed, speed after the first ``skip``, recovery, acceptance, exactness, blocks."""
    ph = s.phases
    last_half_base = s.tokens_per_s_last_half.get(s.baseline, {})
    tables = [
        Table("tokens/s per phase (all requests)", ["system", *ph, "overall", "speedup"],
              [[sy, *[_f(s.tokens_per_s[sy][p]) for p in ph], _f(s.overall[sy]), _f(s.speedup[sy], 2, "x")]
               for sy in s.systems],
              "speedup = overall tokens/s / plain decoding's."),
        Table(f"tokens/s per phase after its first {s.skip} requests", ["system", *ph, "overall", "speedup"],
              [[sy, *[_f(s.tokens_per_s_after_skip[sy][p]) for p in ph], _f(s.overall_after_skip[sy]),
                _f(s.speedup_after_skip[sy], 2, "x")] for sy in s.systems],
              f"requests with index in phase >= {s.skip}; '-' where a phase is not longer than that."),
        Table("tokens/s over the last half of each phase", ["system", *ph],
              [[sy, *[_with_ratio(s.tokens_per_s_last_half[sy][p], last_half_base.get(p)) for p in ph]]
               for sy in s.systems],
              "requests with index in phase >= n // 2; in parentheses: over plain decoding on the same requests."),
        Table(f"recovery: requests until back to {s.fraction:.0%} of steady speed (steady tok/s)",
              ["system", *ph],
              [[sy, *[("not reached" if s.recovery[sy][p] is None and s.steady_tokens_per_s[sy][p] is not None
                       else "-" if s.recovery[sy][p] is None
                       else f"{s.recovery[sy][p]} ({_f(s.steady_tokens_per_s[sy][p])})") for p in ph]]
               for sy in s.systems],
              f"steady = median per-request tokens/s over the phase's last half; recovered at the first request "
              f"r whose {s.window}-request mean reaches {s.fraction:.0%} of it. First phase = cold start."),
        Table("mean acceptance length (acceptance rate) per phase", ["system", *ph, "overall"],
              [[sy, *[f"{_f(s.mean_acceptance_length[sy][p], 2)} ({_f(s.acceptance_rate[sy][p], 2)})" for p in ph],
                f"{_f(s.overall_mal[sy], 2)} ({_f(s.overall_acceptance_rate[sy], 2)})"]
               for sy in s.systems if any(v is not None for v in s.mean_acceptance_length[sy].values())],
              "pooled: tokens emitted on steps with a draft / such steps; accepted / proposed drafts."),
        Table("who drafted: share of target forwards per speculator, per phase",
              ["system", *ph, "drafting time", "controller time"],
              [[sy, *[", ".join(f"{k} {v:.0%}" for k, v in s.speculator_shares[sy][p].items()) or "-" for p in ph],
                _f(None if s.draft_share[sy] is None else 100 * s.draft_share[sy], 1, "%"),
                _f(None if s.controller_share[sy] is None else 100 * s.controller_share[sy], 2, "%")]
               for sy in s.systems if any(len(v) > 1 for v in s.speculator_shares[sy].values())],
              "'none' = a plain decoding step. drafting time = time proposing drafts (speculators and the "
              "controller's decisions) / (that + verify time), over the stream; controller time = the "
              "controller's own part of it plus its bookkeeping after each step, same denominator."),
        Table("greedy output identical to plain decoding", ["system", "identical / checked", "mismatches"],
              [[sy, f"{s.matched[sy]}/{s.checked[sy]}",
                _mismatch_cell([m for m in s.mismatches if m.system == sy])]
               for sy in s.systems if s.checked[sy]],
              "Every system of this engine must match plain decoding token for token. Other engines "
              "(hf-*, vllm-*) are listed for reference: on int8 they run other arithmetic (transformers: "
              "fbgemm's int16-saturating int8 GEMM where the lean core's is exact, and its first new token "
              "from a prefill forward that is not batch-invariant), so near-ties can flip without either "
              "output being wrong (BENCHMARKS.md, issue 2 and lean core sections)."),
    ]
    blk_headers = ["requests", "phase"]
    for sy in s.systems:
        blk_headers.append(f"{sy} tok/s")
        if any(b.mean_acceptance_length.get(sy) is not None for b in s.blocks):
            blk_headers.append(f"{sy} MAL")
    rows = []
    for b in s.blocks:
        row = [f"{b.start}-{b.start + b.size - 1}", "/".join(b.phases)]
        for sy in s.systems:
            row.append(_f(b.tokens_per_s.get(sy)))
            if f"{sy} MAL" in blk_headers:
                row.append(_f(b.mean_acceptance_length.get(sy), 2))
        rows.append(row)
    tables.append(Table(f"per block of {s.block} requests: tokens/s and mean acceptance length (MAL)",
                        blk_headers, rows))
    return tables


def format_markdown(s: DriftSummary, header: Sequence[str] = ()) -> str:
    """The summary tables as Markdown (``header`` lines first, e.g. model and command)."""
    out = list(header)
    for t in summary_tables(s):
        if not t.rows:
            continue
        out += ["", f"**{t.title}**", "", "| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
        out += ["| " + " | ".join(r) + " |" for r in t.rows]
        if t.note:
            out += ["", t.note]
    return "\n".join(out).strip() + "\n"


def print_summary(s: DriftSummary, console: Any = None) -> None:
    """Print the summary tables with rich."""
    from rich.console import Console
    from rich.table import Table as RichTable

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for the block table
            console = Console(width=200)
    for t in summary_tables(s):
        if not t.rows:
            continue
        rt = RichTable(title=t.title, caption=t.note or None)
        for i, h in enumerate(t.headers):
            rt.add_column(h, justify="left" if i == 0 else "right")
        for r in t.rows:
            rt.add_row(*r)
        console.print(rt)


# --------------------------------------------------------------- figure
def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean: out[i] = mean(values[max(0, i - window + 1) : i + 1])."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_drift(records: Sequence[RequestRecord], path: str | Path, window: int = DEFAULT_PLOT_WINDOW,
               title: str = "") -> Path:
    """PNG of tokens/s (and mean acceptance length) vs request index per system, phases marked.

    Top panel: per-request tokens/s, trailing mean over ``window`` requests
    of the same phase. Bottom panel (systems that drafted): mean acceptance
    length pooled over the same trailing window. A system keeps its colour in
    both panels. Dashed lines mark phase boundaries. Uses the Agg canvas
    directly, so no global matplotlib backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = list(dict.fromkeys(r.system for r in records))
    with_mal = [s for s in systems if any(r.draft_steps for r in records if r.system == s)]
    fig = Figure(figsize=(11, 7 if with_mal else 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if with_mal else 1, 1, sharex=True, squeeze=False)[:, 0]
    for i, s in enumerate(systems):
        rs = [r for r in records if r.system == s]
        # One line segment per phase: the smoothing window restarts at each
        # shift, so a drop after the shift is not blurred by the phase before.
        for pi in sorted({r.phase_index for r in rs}):
            seg = sorted((r for r in rs if r.phase_index == pi), key=lambda r: r.request_index)
            x = [r.request_index for r in seg]
            label = s if pi == min(r.phase_index for r in rs) else None
            axes[0].plot(x, rolling_mean([r.tokens_per_s for r in seg], window), color=f"C{i}", label=label,
                         linewidth=1.6)
            if s in with_mal:
                mal = [mean_acceptance_length(seg[max(0, j - window + 1) : j + 1]) for j in range(len(seg))]
                axes[1].plot(x, [float("nan") if v is None else v for v in mal], color=f"C{i}", label=label,
                             linewidth=1.6)
    starts: dict[int, tuple[int, str]] = {}
    for r in records:
        if r.phase_index not in starts or r.request_index < starts[r.phase_index][0]:
            starts[r.phase_index] = (r.request_index, r.phase)
    for ax in axes:
        for pi, (x0, name) in sorted(starts.items()):
            if pi > 0:
                ax.axvline(x0 - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    for pi, (x0, name) in sorted(starts.items()):
        axes[0].annotate(name, xy=(x0, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                         textcoords="offset points", fontsize=9, color="dimgrey")
    axes[0].set_ylabel(f"tokens/s (mean of last {window})")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    if with_mal:
        axes[1].set_ylabel(f"mean acceptance length (last {window})")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    axes[-1].set_xlabel("request index in the stream")
    axes[0].set_title(title or "workload drift: tokens/s per request")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(records: Sequence[RequestRecord], out_dir: str | Path, header: Sequence[str] = (),
                 skip: int = DEFAULT_SKIP, block: int = DEFAULT_BLOCK, title: str = "") -> tuple[DriftSummary, Path, Path]:
    """Write ``summary.md`` and ``drift.png`` into ``out_dir``; returns (summary, md path, png path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, skip=skip, block=block)
    md = out / "summary.md"
    md.write_text(format_markdown(summary, header), encoding="utf-8")
    png = plot_drift(records, out / "drift.png", title=title)
    return summary, md, png


PEER_PREFIXES = ("hf-", "vllm-")


def is_peer(system: str) -> bool:
    """Another engine's system (transformers, vLLM), not bound by this engine's exactness guarantee."""
    return system.startswith(PEER_PREFIXES)
