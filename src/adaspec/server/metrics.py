"""Server metrics: Prometheus counters (one registry per app) and the dashboard's series.

Written by the engine worker thread after every step and every finished
request; read by ``/metrics`` and ``/dashboard/stats.json`` on the event loop.
One lock guards the Python-side aggregates; prometheus_client objects are
thread-safe on their own.

Per speculator (the key ``steps_by_speculator`` uses; "none" for a step
without draft tokens)::

    acceptance rate        = accepted / proposed draft tokens
    mean acceptance length = tokens emitted on draft steps / draft steps
                             (accepted + the recovered or bonus token, per target forward)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

NO_SPECULATOR = "none"  # steps_by_speculator key of a step with no draft tokens
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DRAFT_TOKEN_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Batch-size bands for the lookahead chosen under load (label of adaspec_lookahead_by_batch_size).
BATCH_BANDS = ((1, "1"), (4, "2-4"), (8, "5-8"), (16, "9-16"), (10**9, "17+"))
THROUGHPUT_WINDOW_S = 10.0  # tokens/s gauge averages over this many seconds
HISTORY_S = 600  # seconds of per-second buckets kept for the dashboard
RECENT_REQUESTS = 25


@dataclass
class _SpeculatorTotals:
    proposed: int = 0
    accepted: int = 0
    draft_steps: int = 0
    emitted_on_draft_steps: int = 0
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "proposed": self.proposed,
            "accepted": self.accepted,
            "draft_steps": self.draft_steps,
            "steps": self.steps,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "mean_acceptance_length": (self.emitted_on_draft_steps / self.draft_steps
                                       if self.draft_steps else None),
        }


@dataclass
class _Bucket:
    """One second of traffic."""

    second: int
    tokens: int = 0
    requests: int = 0
    by_speculator: dict[str, _SpeculatorTotals] = field(default_factory=dict)


@dataclass
class RequestRecord:
    """A finished request as the dashboard lists it (no prompt or output text)."""

    request_id: str
    tenant: str
    endpoint: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    elapsed_s: float
    ttft_s: Optional[float]
    acceptance_rate: Optional[float]  # None when nothing was proposed
    mean_acceptance_length: Optional[float]  # None without draft steps
    steps_by_speculator: dict[str, int]
    finished_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tokens_per_s"] = self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return d


class ServerMetrics:
    """Everything the server measures.

    Args:
        speculators: returns the engine's speculators by name (read at scrape
            time for the learned-state size; a speculator that has
            ``memory_stats()`` with ``{"tenants": {tenant: {"tokens", "nodes"}}}``
            is reported per tenant).
        queue_depth / active_requests: read at scrape time.
    """

    def __init__(self, speculators: Callable[[], dict[str, Any]] = dict,
                 queue_depth: Callable[[], int] = lambda: 0,
                 active_requests: Callable[[], int] = lambda: 0,
                 prefix_cache: Callable[[], Any] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._started = time.time()
        self._buckets: deque[_Bucket] = deque(maxlen=HISTORY_S)
        self._totals: dict[str, _SpeculatorTotals] = {}
        self._lookahead: dict[int, int] = {}
        self._recent: deque[RequestRecord] = deque(maxlen=RECENT_REQUESTS)
        self._tokens_total = 0
        self._prompt_tokens_total = 0
        self._requests_total = 0
        self.speculators = speculators
        self.queue_depth = queue_depth
        self.active_requests = active_requests
        self.prefix_cache = prefix_cache  # returns the engine's PrefixCache or None (read at scrape time)
        self._batches = 0
        self._batch_requests = 0
        self._batch_rows = 0
        r = self.registry
        self.requests = Counter("adaspec_requests", "Finished requests", ["endpoint", "finish_reason"], registry=r)
        self.errors = Counter("adaspec_request_errors", "Requests answered with an error", ["status", "code"],
                              registry=r)
        self.prompt_tokens = Counter("adaspec_prompt_tokens", "Prompt tokens of started requests", registry=r)
        self.generation_tokens = Counter("adaspec_generation_tokens", "Generated tokens", registry=r)
        Gauge("adaspec_tokens_per_second", f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s",
              registry=r).set_function(self.tokens_per_s)
        self.ttft = Histogram("adaspec_time_to_first_token_seconds", "Submit to first generated token (incl. queue)",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("adaspec_inter_token_latency_seconds",
                             "Time between generated tokens (a step's gap divided over its tokens)",
                             buckets=TOKEN_GAP_BUCKETS_S, registry=r)
        self.e2e = Histogram("adaspec_request_duration_seconds", "Submit to finish", buckets=LATENCY_BUCKETS_S,
                             registry=r)
        self.queue_wait = Histogram("adaspec_queue_wait_seconds", "Submit to start (prefill)",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.draft_tokens = Counter("adaspec_draft_tokens", "Draft tokens proposed", ["speculator"], registry=r)
        self.accepted_tokens = Counter("adaspec_accepted_tokens", "Draft tokens accepted", ["speculator"],
                                       registry=r)
        self.draft_steps = Counter("adaspec_draft_steps", "Target forwards that verified >= 1 draft token",
                                   ["speculator"], registry=r)
        self.acceptance_rate = Gauge("adaspec_acceptance_rate", "accepted / proposed draft tokens since start",
                                     ["speculator"], registry=r)
        self.mean_acceptance_length = Gauge(
            "adaspec_mean_acceptance_length", "Tokens emitted per target forward on draft steps, since start",
            ["speculator"], registry=r)
        self.lookahead = Histogram("adaspec_draft_tokens_per_step",
                                   "Draft tokens verified per target forward (the lookahead used)",
                                   buckets=DRAFT_TOKEN_BUCKETS, registry=r)
        self.controller_steps = Counter("adaspec_controller_steps", "Steps by the speculator the controller chose "
                                        f"('{NO_SPECULATOR}': plain decoding)", ["speculator"], registry=r)
        Gauge("adaspec_intra_op_threads", "torch intra-op threads the engine runs with (--threads)",
              registry=r).set_function(_torch_threads)
        Gauge("adaspec_queue_depth", "Requests waiting to start", registry=r).set_function(
            lambda: self.queue_depth())
        Gauge("adaspec_active_requests", "Requests being decoded", registry=r).set_function(
            lambda: self.active_requests())
        r.register(_LearnedStateCollector(lambda: self.speculators()))
        r.register(_OnlineLearningCollector(lambda: self.speculators()))
        # continuous batching
        self.batch_size = Histogram("adaspec_batch_size", "Requests in one batched target forward",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_rows = Histogram("adaspec_batch_rows_fed", "Rows (tokens) fed per batched target forward: "
                                    "verify rows and prefill chunks", buckets=BATCH_ROW_BUCKETS, registry=r)
        self.lookahead_by_batch = Histogram("adaspec_lookahead_by_batch_size",
                                            "Draft tokens a request verified per step, by the batch size it ran in",
                                            ["batch_size"], buckets=DRAFT_TOKEN_BUCKETS, registry=r)
        r.register(_PrefixCacheCollector(lambda: self.prefix_cache()))

    # ------------------------------------------------------------ writers
    def record_step(self, speculator: str, num_draft_tokens: int, num_accepted: int, num_emitted: int,
                    now: Optional[float] = None) -> None:
        """Count one target forward (``speculator``: the stats key, "none" without drafts)."""
        self.controller_steps.labels(speculator).inc()
        self.lookahead.observe(num_draft_tokens)
        self.generation_tokens.inc(num_emitted)
        with self._lock:
            bucket = self._bucket(now)
            bucket.tokens += num_emitted
            self._tokens_total += num_emitted
            for totals in (self._totals.setdefault(speculator, _SpeculatorTotals()),
                           bucket.by_speculator.setdefault(speculator, _SpeculatorTotals())):
                totals.steps += 1
                if num_draft_tokens > 0:
                    totals.proposed += num_draft_tokens
                    totals.accepted += num_accepted
                    totals.draft_steps += 1
                    totals.emitted_on_draft_steps += num_emitted
            self._lookahead[num_draft_tokens] = self._lookahead.get(num_draft_tokens, 0) + 1
            t = self._totals[speculator]
        if num_draft_tokens > 0:
            self.draft_tokens.labels(speculator).inc(num_draft_tokens)
            self.accepted_tokens.labels(speculator).inc(num_accepted)
            self.draft_steps.labels(speculator).inc()
            self.acceptance_rate.labels(speculator).set(t.accepted / t.proposed)
            self.mean_acceptance_length.labels(speculator).set(t.emitted_on_draft_steps / t.draft_steps)

    def record_token_gap(self, gap_s: float, num_tokens: int) -> None:
        """A step emitted ``num_tokens`` tokens ``gap_s`` after the request's previous ones."""
        for _ in range(num_tokens):
            self.itl.observe(gap_s / num_tokens)

    def record_batch(self, requests: int, rows: int) -> None:
        """One batched forward over ``requests`` requests feeding ``rows`` rows."""
        self.batch_size.observe(requests)
        self.batch_rows.observe(rows)
        with self._lock:
            self._batches += 1
            self._batch_requests += requests
            self._batch_rows += rows

    def record_batch_lookahead(self, batch_size: int, num_draft_tokens: int) -> None:
        """A request's lookahead in a step that ran beside ``batch_size - 1`` others."""
        band = next(name for top, name in BATCH_BANDS if batch_size <= top)
        self.lookahead_by_batch.labels(band).observe(num_draft_tokens)

    def batch_stats(self) -> dict[str, Any]:
        """Batched forwards since start and their mean requests and rows."""
        with self._lock:
            n = self._batches
            return {"forwards": n, "mean_batch_size": self._batch_requests / n if n else None,
                    "mean_rows_fed": self._batch_rows / n if n else None}

    def record_start(self, prompt_tokens: int, queue_wait_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        with self._lock:
            self._prompt_tokens_total += prompt_tokens
        self.queue_wait.observe(queue_wait_s)

    def record_finish(self, record: RequestRecord) -> None:
        """A request ended (finished, timed out or cancelled)."""
        self.requests.labels(record.endpoint, record.finish_reason).inc()
        self.e2e.observe(record.elapsed_s)
        with self._lock:
            self._recent.append(record)
            self._requests_total += 1
            self._bucket(None).requests += 1

    def record_error(self, status: int, code: Optional[str]) -> None:
        self.errors.labels(str(status), code or "").inc()

    def _bucket(self, now: Optional[float]) -> _Bucket:
        second = int(now if now is not None else time.time())
        if not self._buckets or self._buckets[-1].second < second:
            self._buckets.append(_Bucket(second))
        return self._buckets[-1]

    # ------------------------------------------------------------ readers
    def tokens_seen(self) -> int:
        """Prompt tokens started plus tokens generated since start (what learned state may grow by)."""
        with self._lock:
            return self._prompt_tokens_total + self._tokens_total

    def tokens_per_s(self, window_s: float = THROUGHPUT_WINDOW_S) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.time()
        with self._lock:
            n = sum(b.tokens for b in self._buckets if b.second > now - window_s)
        return n / window_s

    def snapshot(self, window_s: int = 120) -> dict[str, Any]:
        """The dashboard's data: per-second series for the last ``window_s`` s, totals, recent requests.

        Series are aligned to whole seconds, oldest first; acceptance values are
        ``None`` for seconds in which the speculator proposed nothing.
        """
        now = int(time.time())
        seconds = list(range(now - window_s + 1, now + 1))
        with self._lock:
            by_second = {b.second: b for b in self._buckets if b.second > now - window_s}
            names = sorted({n for b in by_second.values() for n in b.by_speculator} | set(self._totals))
            series: dict[str, Any] = {
                "t": [s - now for s in seconds],
                "tokens_per_s": [by_second[s].tokens if s in by_second else 0 for s in seconds],
                "requests": [by_second[s].requests if s in by_second else 0 for s in seconds],
                "acceptance_rate": {},
                "mean_acceptance_length": {},
                "steps": {},
            }
            for name in names:
                per = [by_second[s].by_speculator.get(name) if s in by_second else None for s in seconds]
                series["steps"][name] = [p.steps if p else 0 for p in per]
                if name == NO_SPECULATOR:
                    continue
                series["acceptance_rate"][name] = [p.accepted / p.proposed if p and p.proposed else None
                                                   for p in per]
                series["mean_acceptance_length"][name] = [
                    p.emitted_on_draft_steps / p.draft_steps if p and p.draft_steps else None for p in per]
            return {
                "now": time.time(),
                "uptime_s": time.time() - self._started,
                "queue_depth": self.queue_depth(),
                "active_requests": self.active_requests(),
                "tokens_per_s": sum(b.tokens for b in by_second.values() if b.second > now - THROUGHPUT_WINDOW_S)
                / THROUGHPUT_WINDOW_S,
                "totals": {
                    "requests": self._requests_total,
                    "generated_tokens": self._tokens_total,
                    "by_speculator": {n: t.to_dict() for n, t in sorted(self._totals.items())},
                    "draft_tokens_per_step": {str(k): v for k, v in sorted(self._lookahead.items())},
                },
                "series": series,
                "recent_requests": [r.to_dict() for r in reversed(self._recent)],
                "batching": {"forwards": self._batches,
                             "mean_batch_size": self._batch_requests / self._batches if self._batches else None,
                             "mean_rows_fed": self._batch_rows / self._batches if self._batches else None,
                             "prefix_cache": _prefix_dict(self.prefix_cache())},
                "online_learning": self._online(),
            }

    def _online(self) -> dict[str, Any]:
        """Per learning speculator, its ``online_stats()`` (empty when none learns online)."""
        out = {}
        for name, spec in _sources(self.speculators() or {}, "online_stats"):
            try:
                out[name] = spec.online_stats()
            except Exception:
                continue
        return out

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


class _LearnedStateCollector:
    """``adaspec_learned_state_tokens{speculator,tenant}`` read from speculators at scrape time."""

    def __init__(self, speculators: Callable[[], dict[str, Any]]) -> None:
        self._speculators = speculators

    def describe(self) -> Iterable:
        return []  # unknown label sets until scraped; keeps registration side-effect free

    def collect(self) -> Iterable[GaugeMetricFamily]:
        tokens = GaugeMetricFamily("adaspec_learned_state_tokens", "Tokens held in learned speculator state",
                                   labels=["speculator", "tenant"])
        nodes = GaugeMetricFamily("adaspec_learned_state_nodes", "Records (e.g. trie nodes) of learned state",
                                  labels=["speculator", "tenant"])
        for name, spec in _memory_sources(self._speculators() or {}):
            try:
                stats = spec.memory_stats()
            except Exception:  # a metrics scrape must never fail because of one speculator
                continue
            for tenant, s in (stats.get("tenants") or {}).items():
                tokens.add_metric([name, str(tenant)], float(s.get("tokens", 0)))
                nodes.add_metric([name, str(tenant)], float(s.get("nodes", 0)))
        yield tokens
        yield nodes


def _prefix_dict(cache: Any) -> Optional[dict[str, Any]]:
    if cache is None:
        return None
    st = cache.stats
    return {"lookups": st.lookups, "hits": st.hits, "hit_rate": st.hit_rate, "tokens_saved": st.tokens_saved,
            "lookup_tokens": st.lookup_tokens, "saved_fraction": st.saved_fraction, "evictions": st.evictions,
            "entries": cache.num_entries, "tokens_held": cache.tokens_held, "max_tokens": cache.max_tokens}


class _PrefixCacheCollector:
    """``adaspec_prefix_cache_*`` read from the engine's prefix cache at scrape time (nothing when off)."""

    def __init__(self, cache: Callable[[], Any]) -> None:
        self._cache = cache

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily

        d = _prefix_dict(self._cache())
        if d is None:
            return
        yield CounterMetricFamily("adaspec_prefix_cache_lookups", "Prompts looked up in the prefix cache",
                                  value=d["lookups"])
        yield CounterMetricFamily("adaspec_prefix_cache_hits", "Prompts that reused a cached prefix", value=d["hits"])
        yield CounterMetricFamily("adaspec_prefix_cache_tokens_saved", "Prompt tokens not prefilled (reused KV)",
                                  value=d["tokens_saved"])
        yield CounterMetricFamily("adaspec_prefix_cache_lookup_tokens", "Prompt tokens looked up (could be reused)",
                                  value=d["lookup_tokens"])
        yield GaugeMetricFamily("adaspec_prefix_cache_hit_rate", "hits / lookups since start", value=d["hit_rate"])
        yield GaugeMetricFamily("adaspec_prefix_cache_tokens_held", "KV positions the cached prefixes hold",
                                value=d["tokens_held"])
        yield GaugeMetricFamily("adaspec_prefix_cache_entries", "Cached prefixes", value=d["entries"])


class _OnlineLearningCollector:
    """The online trainer's state (``adaspec_online_*``), read from learning speculators at scrape time.

    A speculator takes part when it has ``online_stats()``
    (:meth:`adaspec.online.learned.LearnedHeadSpeculator.online_stats`).
    """

    def __init__(self, speculators: Callable[[], dict[str, Any]]) -> None:
        self._speculators = speculators

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        version = GaugeMetricFamily("adaspec_online_head_version", "Learned-head version new requests draft with "
                                    "(0: none published yet)", labels=["speculator", "tenant"])
        alive = GaugeMetricFamily("adaspec_online_trainer_alive", "1 while the background trainer process runs",
                                  labels=["speculator"])
        counts = GaugeMetricFamily("adaspec_online_events", "Documents sent to the trainer, versions published, "
                                   "rollbacks, since start", labels=["speculator", "event"])
        heldout = GaugeMetricFamily("adaspec_online_heldout_acceptance_length", "Held-out greedy mean acceptance "
                                    "length of the last round's heads", labels=["speculator", "tenant", "head"])
        buffer = GaugeMetricFamily("adaspec_online_buffer_positions", "Labelled positions in the trainer's buffer "
                                   "after the last round", labels=["speculator", "tenant", "part"])
        live = GaugeMetricFamily("adaspec_online_live_acceptance_rate", "Judged acceptance rate of each served "
                                 "learned-head version", labels=["speculator", "tenant", "version"])
        vocab = GaugeMetricFamily("adaspec_online_draft_vocab_adapted", "Draft ids of the learned-head version new "
                                  "requests draft with that hold a token the static head's vocabulary lacks",
                                  labels=["speculator", "tenant"])
        for name, spec in _sources(self._speculators() or {}, "online_stats"):
            try:
                s = spec.online_stats()
            except Exception:
                continue
            alive.add_metric([name], 1.0 if s.get("trainer_alive") else 0.0)
            for event in ("docs_sent", "published", "rollbacks"):
                counts.add_metric([name, event], float(s.get(event, 0)))
            for tenant, v in (s.get("versions") or {}).items():
                version.add_metric([name, str(tenant)], float(v))
            for tenant, n in (s.get("vocab_adapted") or {}).items():
                vocab.add_metric([name, str(tenant)], float(n))
            last = s.get("last_round") or {}
            if last:
                t = str(last.get("tenant", ""))
                for head in ("candidate", "serving", "static"):
                    x = last.get(f"{head}_acceptance_length")
                    if isinstance(x, (int, float)) and x == x:
                        heldout.add_metric([name, t, head], float(x))
                for part in ("recent", "reservoir", "heldout"):
                    buffer.add_metric([name, t, part], float((last.get("buffer") or {}).get(f"{part}_positions", 0)))
            for key, d in (s.get("live") or {}).items():
                tenant, _, v = key.rpartition(":v")
                if d.get("drafted"):
                    live.add_metric([name, tenant, v], d["accepted"] / d["drafted"])
        yield from (version, alive, counts, heldout, buffer, live, vocab)


def _sources(speculators: dict[str, Any], method: str) -> list[tuple[str, Any]]:
    """Speculators with ``method()``, looking inside composites (their ``children``, e.g. atlas)."""
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()
    stack = list(speculators.items())
    while stack:
        name, spec = stack.pop(0)
        if id(spec) in seen:
            continue
        seen.add(id(spec))
        if callable(getattr(spec, method, None)):
            out.append((name, spec))
        for child in (getattr(spec, "children", None) or []) + (getattr(spec, "speculators", None) or []):
            stack.append((getattr(child, "name", type(child).__name__), child))
    return out


def _memory_sources(speculators: dict[str, Any]) -> list[tuple[str, Any]]:
    """Speculators with ``memory_stats()``, looking inside composites (e.g. atlas)."""
    return _sources(speculators, "memory_stats")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()

