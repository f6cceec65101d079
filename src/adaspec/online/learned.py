"""The learned-head speculator: a draft head that keeps training on the traffic it serves.

It drafts exactly as the static draft head does
(:class:`adaspec.speculators.draft_head.DraftHeadSpeculator`, EAGLE-style
feature-level autoregression), with per-tenant weights that a background
trainer (:mod:`adaspec.online.trainer`, a separate process) fine-tunes from the
static head on the tenant's own traffic and publishes as numbered versions
(:mod:`adaspec.online.versions`).

Lifecycle, per request:

- ``start_request``: the request is pinned to its tenant's current version (a
  request keeps the version it started with, across any hot swap); a tenant
  with no published version yet gets no drafts from this speculator (the
  static head, a separate candidate of the controller, is the floor).
- every verify step: the engine hands over the target's features at the
  committed positions and its greedy tokens there (``observe_features``), and
  the committed tokens (``observe``): the **labels** of this request;
- ``stop_request``: the request's labels become one
  :class:`~adaspec.online.buffer.TrafficDoc`, sent to the trainer (never for a
  private request).

Hot swap: after a round the trainer reports a published version; the new
weights are read and quantized on a background thread and become the
tenant's current version for requests that start afterwards. Serving never
waits for it.

Rollback: the speculator judges each of its drafts against what the target
committed (accepted = the draft's longest prefix equal to the committed
tokens). When a version's acceptance rate over its first
``rollback_min_drafts`` judged draft tokens is below the previous learned
version's recent rate by more than ``rollback_margin``, the tenant goes back
to the previous version and the trainer trains on from it.

Never imports transformers; token ids, features and probabilities in, drafts out.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from adaspec.online.buffer import doc_from_capture
from adaspec.online.trainer import OnlineConfig, recv_message, send_message
from adaspec.online.versions import CURRENT_FILE, head_digest, load_version, tenant_key
from adaspec.speculators.draft_head import DraftHeadNet, DraftHeadSpeculator, _DraftRuntime
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext, TokenTree

log = logging.getLogger(__name__)


@dataclass
class _Capture:
    """One request's labels so far."""

    tenant: str
    prompt_len: int
    tokens: list[int]
    version: int
    runtime: Optional[_DraftRuntime]  # the pinned version's drafting runtime (None: no version yet)
    private: bool = False
    hidden: list[torch.Tensor] = field(default_factory=list)  # [n_i, H] float16
    argmax: list[torch.Tensor] = field(default_factory=list)  # [n_i] int64
    last_draft: Optional[list[int]] = None  # the last chain this speculator proposed, to be judged


@dataclass
class _VersionStats:
    drafted: int = 0
    accepted: int = 0
    window: deque = field(default_factory=lambda: deque(maxlen=64))  # (drafted, accepted) per judged draft

    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def recent_rate(self) -> float:
        d = sum(x for x, _ in self.window)
        return sum(a for _, a in self.window) / d if d else float("nan")


class TrainerClient:
    """The trainer process behind two pipes; sends never block the caller.

    Documents go through a local queue drained by a sender thread (the pipe
    blocks while the trainer is busy with a round); results are polled without
    blocking. The process (``python -m adaspec.online.trainer``) is started
    lazily and stops when the client closes or the server process dies (its
    pipe closes).

    Args:
        base_path: the static head's checkpoint file.
        embed: ``[V, H]`` target input embeddings (sent once, as float16).
        root: the versions folder.
        config: the trainer's settings.
        replay_path: broad-data replay file, or None.
        lm_head: ``[V, H]`` target LM-head weight when it is not tied to ``embed`` (sent once,
            as float16), for the trainer's draft-vocabulary adaptation; None: tied.
    """

    def __init__(self, base_path: str | Path, embed: torch.Tensor, root: str | Path, config: OnlineConfig,
                 replay_path: Optional[str | Path] = None, lm_head: Optional[torch.Tensor] = None) -> None:
        self.base_path, self.root, self.config = str(base_path), str(root), config
        self.replay_path = str(replay_path) if replay_path else None
        self._embed = embed  # sent once, as float16, when the process starts
        self._lm_head = lm_head
        self._outbox: queue.Queue = queue.Queue(maxsize=4096)
        self._proc = None
        self._conn_in = None  # results from the trainer
        self._conn_out = None  # messages to the trainer
        self._sender: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.errors: deque[str] = deque(maxlen=10)
        self.dropped = 0  # documents dropped because the outbox was full
        self.closed = False

    def _start(self) -> None:
        """Start ``python -m adaspec.online.trainer`` on two pipes (no re-import of the caller's main module)."""
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "adaspec.online.trainer", str(to_child_r),
                                           str(from_child_w)], pass_fds=(to_child_r, from_child_w),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._conn_out = Connection(to_child_w, readable=False)
        self._conn_in = Connection(from_child_r, writable=False)
        embed = self._embed.detach().to(torch.float16).contiguous()
        lm_head = None if self._lm_head is None else self._lm_head.detach().to(torch.float16).contiguous()
        self._outbox.put(("init", self.base_path, embed, self.root, asdict(self.config), self.replay_path, lm_head))
        self._embed = self._lm_head = None  # sent once; the trainer keeps its own copy
        self._sender = threading.Thread(target=self._send_loop, name="adaspec-trainer-send", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                send_message(self._conn_out, msg)
            except (OSError, EOFError, BrokenPipeError) as e:
                self.errors.append(f"trainer pipe closed: {e}")
                return

    def send(self, msg: tuple) -> None:
        """Queue a message for the trainer (started on first use); drops it when the queue is full."""
        with self._lock:
            if self.closed:
                return
            if self._proc is None:
                self._start()
        try:
            self._outbox.put_nowait(msg)
        except queue.Full:
            self.dropped += 1

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def poll(self) -> list[tuple]:
        """Messages the trainer sent since the last call (never blocks)."""
        out = []
        conn = self._conn_in
        if conn is None:
            return out
        try:
            while conn.poll(0):
                out.append(recv_message(conn))
        except (EOFError, OSError):
            self._conn_in = None
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the trainer (what it published stays on disk); never raises.

        It is asked to stop; one busy with a round (it reads messages between
        rounds) is terminated after ``timeout_s``, and killed if that fails.
        Publication is atomic, so a trainer stopped mid-write leaves the last
        good version.
        """
        import subprocess

        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self._proc is None:
            return
        try:
            self._outbox.put_nowait(("stop",))
        except queue.Full:
            pass
        self._outbox.put(None)
        if self._sender is not None:
            self._sender.join(timeout_s)
        for stop in (None, self._proc.terminate, self._proc.kill):
            if stop is not None:
                stop()
            try:
                self._proc.wait(timeout_s)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            log.warning("online trainer (pid %s) did not stop", self._proc.pid)
        for conn in (self._conn_in, self._conn_out):
            if conn is not None:
                conn.close()


class LearnedHeadSpeculator(DraftHeadSpeculator):
    """Per-tenant draft heads fine-tuned online (see the module docstring).

    Args:
        static_net: the static head (float32) every tenant's head starts from.
        embed_weight: ``[V, H]`` float32 target input embeddings.
        static_path: the static head's checkpoint file (the trainer process reads it).
        root: the versions folder (``<state_dir>/learned_head``); None: a
            temporary folder removed at :meth:`close` (nothing persists).
        config: the trainer's settings. Default :class:`OnlineConfig`.
        replay_path: broad-data replay file for the trainer, or None.
        train: start the trainer process on the first finished request; False
            serves published versions only (learning elsewhere). Default True.
        rollback_min_drafts: judged draft tokens of a new version before a
            rollback is considered. Default 128.
        rollback_margin: acceptance-rate drop (absolute) that rolls back. Default 0.1.
        draft_before_first_version: a tenant without a published version drafts
            with the static head's weights (version 0) instead of not at all; for
            running the learned head alone. Default False (beside the static
            head, a copy of it adds nothing).
        seed / int8: as for :class:`DraftHeadSpeculator`.
        lm_head_weight: ``[V, H]`` target LM-head weight where it is not tied to
            ``embed_weight`` (the rows of reassigned draft ids); None: tied.

    Attributes:
        on_swap: called as ``on_swap(tenant, version, info)`` when a tenant's
            current version changes (publication or rollback); the engine wires
            it to the controller so old estimates do not stick to a new version.

    Raises:
        ValueError: embeddings that do not fit the head, or an invalid config.
    """

    name = "learned_head"
    wants_features = True

    def __init__(self, static_net: DraftHeadNet, embed_weight: torch.Tensor, static_path: str | Path,
                 root: Optional[str | Path] = None, config: Optional[OnlineConfig] = None,
                 replay_path: Optional[str | Path] = None, train: bool = True, rollback_min_drafts: int = 128,
                 rollback_margin: float = 0.1, draft_before_first_version: bool = False, seed: int = 0,
                 int8: bool = True, lm_head_weight: Optional[torch.Tensor] = None) -> None:
        self.config = config or OnlineConfig()
        self.config.validate()
        self._static_float = copy.deepcopy(static_net).eval()
        super().__init__(static_net, embed_weight, seed=seed, int8=int8)
        self._temporary_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="adaspec-learned-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_digest = head_digest(self._static_float)
        self.client = TrainerClient(static_path, embed_weight, self.root, self.config, replay_path,
                                    lm_head=lm_head_weight) if train else None
        self.rollback_min_drafts, self.rollback_margin = rollback_min_drafts, rollback_margin
        self.on_swap: Optional[Callable[[str, int, dict], None]] = None
        self._lock = threading.Lock()
        self._current: dict[str, tuple[int, _DraftRuntime]] = {}  # tenant -> (version, drafting runtime)
        self._previous: dict[str, list[tuple[int, _DraftRuntime]]] = {}  # tenant -> older versions, newest last
        self._captures: dict[str, _Capture] = {}
        self._vstats: dict[tuple[str, int], _VersionStats] = {}
        self.rounds: deque[dict] = deque(maxlen=50)  # the trainer's last rounds, newest last
        self.published = 0
        self.rollbacks = 0
        self.restored_buffers: dict[str, dict] = {}  # tenant -> sizes of the label buffer the trainer read back
        self.docs_sent = 0
        self._loading: set[tuple[str, int]] = set()
        self._loaded: list[tuple[str, int, _DraftRuntime, dict]] = []  # swaps ready, applied on the engine's thread
        self._version0 = self.runtime if draft_before_first_version else None  # the static weights' runtime
        self._load_published()

    # ---------------------------------------------------------------- versions
    def _load_published(self) -> None:
        """Serve what an earlier run published under ``root`` (learned weights survive restarts)."""
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not (folder / CURRENT_FILE).is_file():
                continue
            try:
                import json

                cur = json.loads((folder / CURRENT_FILE).read_text("utf-8"))
                tenant = str(cur["tenant"])
                if folder.name != tenant_key(tenant) or cur.get("base") != self.base_digest:
                    continue
                net = load_version(self.root, tenant, int(cur["version"]), self._static_float)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("learned head in %s not loaded (%s); that tenant starts from the static head", folder, e)
                continue
            self._current[tenant] = (int(cur["version"]), self._prepare(net))

    def current_version(self, tenant: str = DEFAULT_TENANT) -> int:
        """The version new requests of ``tenant`` draft with (0: none yet)."""
        cur = self._current.get(tenant)
        return cur[0] if cur else 0

    def _swap(self, tenant: str, version: int, net: _DraftRuntime, info: dict) -> None:
        with self._lock:
            old = self._current.get(tenant)
            if old is not None and old[0] != version:
                prev = self._previous.setdefault(tenant, [])
                prev.append(old)
                del prev[:-2]
            self._current[tenant] = (version, net)
        if self.on_swap is not None:
            self.on_swap(tenant, version, info)

    def _load_async(self, tenant: str, version: int, info: dict) -> None:
        key = (tenant, version)
        if key in self._loading:
            return
        self._loading.add(key)

        def load() -> None:
            try:
                net = self._prepare(load_version(self.root, tenant, version, self._static_float))
                with self._lock:
                    self._loaded.append((tenant, version, net, info))
            except Exception as e:  # a bad file must not stop serving: keep the current version
                log.warning("learned head v%d of %r not loaded: %s", version, tenant, e)
            finally:
                self._loading.discard(key)

        threading.Thread(target=load, name="adaspec-learned-load", daemon=True).start()

    def poll_trainer(self) -> None:
        """Apply versions loaded since the last call; take the trainer's reports and start loading
        newly published versions (never blocks). Called on the engine's thread, at request start."""
        with self._lock:
            ready, self._loaded = self._loaded, []
        for tenant, version, net, info in ready:
            self._swap(tenant, version, net, info)
        if self.client is None:
            return
        for msg in self.client.poll():
            if msg[0] == "round":
                r = msg[1]
                self.rounds.append(r)
                if r.get("published"):
                    self.published += 1
                    self._load_async(r["tenant"], int(r["published"]), r)
            elif msg[0] == "ready":
                self.restored_buffers = dict(msg[1].get("restored_buffers") or {})
            elif msg[0] == "error":
                self.client.errors.append(str(msg[1]))
                log.warning("online trainer: %s", msg[1])

    # ---------------------------------------------------------------- lifecycle
    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        self._begin(request_id, prompt_ids, tenant, private=False)

    def start_request_private(self, request_id: str, prompt_ids: Sequence[int],
                              tenant: str = DEFAULT_TENANT) -> None:
        self._begin(request_id, prompt_ids, tenant, private=True)

    def _begin(self, request_id: str, prompt_ids: Sequence[int], tenant: str, private: bool) -> None:
        self.poll_trainer()
        super().start_request(request_id, prompt_ids, tenant)
        cur = self._current.get(tenant)
        self._captures[request_id] = _Capture(tenant, len(prompt_ids), [int(t) for t in prompt_ids],
                                              cur[0] if cur else 0, cur[1] if cur else self._version0, private)

    def observe_features(self, request_id: str, hidden: torch.Tensor, target_argmax: torch.Tensor) -> None:
        """The target's features at this step's committed positions.

        Args:
            hidden: ``[n, H]`` float32: row i is the feature that predicted the
                step's i-th committed token.
            target_argmax: ``[n]`` int64, the target's greedy token at each of those rows.
        """
        cap = self._captures.get(request_id)
        if cap is None or cap.private:
            return
        cap.hidden.append(hidden.detach().to(torch.float16))
        cap.argmax.append(target_argmax.detach().long())

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        cap = self._captures.get(request_id)
        if cap is None:
            return
        if cap.last_draft:
            self._judge(cap, cap.last_draft, [int(t) for t in token_ids])
            cap.last_draft = None
        cap.tokens.extend(int(t) for t in token_ids)

    def stop_request(self, request_id: str) -> None:
        super().stop_request(request_id)
        cap = self._captures.pop(request_id, None)
        if cap is None or cap.private or self.client is None:
            return
        doc = doc_from_capture(cap.tokens, cap.prompt_len, cap.hidden, cap.argmax, request_id)
        if doc is not None and doc.num_labels >= 2:
            self.client.send(("doc", cap.tenant, doc))
            self.docs_sent += 1

    # ---------------------------------------------------------------- judging and rollback
    def _judge(self, cap: _Capture, draft: list[int], committed: list[int]) -> None:
        accepted = 0
        for d, c in zip(draft, committed):
            if d != c:
                break
            accepted += 1
        n = min(len(draft), max(1, len(committed)))  # a stop condition may have cut the step
        st = self._vstats.setdefault((cap.tenant, cap.version), _VersionStats())
        st.drafted += n
        st.accepted += min(accepted, n)
        st.window.append((n, min(accepted, n)))
        self._maybe_roll_back(cap.tenant, cap.version)

    def _maybe_roll_back(self, tenant: str, version: int) -> None:
        cur = self._current.get(tenant)
        prev = self._previous.get(tenant)
        if cur is None or cur[0] != version or not prev:
            return
        st = self._vstats.get((tenant, version))
        before = self._vstats.get((tenant, prev[-1][0]))
        if st is None or before is None or st.drafted < self.rollback_min_drafts or before.drafted < self.rollback_min_drafts:
            return
        if st.rate() < before.recent_rate() - self.rollback_margin:
            old_version, old_net = prev.pop()
            with self._lock:
                self._current[tenant] = (old_version, old_net)
            self.rollbacks += 1
            log.warning("learned head of %r: v%d accepts %.2f vs v%d's %.2f; rolled back", tenant, version,
                        st.rate(), old_version, before.recent_rate())
            if self.client is not None:
                self.client.send(("rollback", tenant, old_version))
            if self.on_swap is not None:
                self.on_swap(tenant, old_version, {"rollback_from": version})

    # ---------------------------------------------------------------- drafting
    def _runtime_for(self, ctx: ProposeContext) -> _DraftRuntime:
        """The version the request started with (see :meth:`propose` for requests without one)."""
        cap = self._captures.get(ctx.request_id)
        return cap.runtime if cap is not None and cap.runtime is not None else self.runtime

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        """Draft with the request's pinned version; nothing before the tenant's first version."""
        cap = self._captures.get(ctx.request_id)
        if cap is None or cap.runtime is None:
            return DraftProposal(speculator=self.name)
        proposal = super().propose(ctx, max_draft_tokens)
        cap.last_draft = list(proposal.token_ids) or None
        return proposal

    def propose_tree(self, ctx: ProposeContext, max_depth: int, width: int = 3) -> TokenTree:
        cap = self._captures.get(ctx.request_id)
        if cap is None or cap.runtime is None:
            return TokenTree()
        return super().propose_tree(ctx, max_depth, width)

    # ---------------------------------------------------------------- governance
    def forget_tenant(self, tenant: str) -> int:
        """Delete ``tenant``'s learned versions (files included) and stop training for it."""
        n = 0
        with self._lock:
            if self._current.pop(tenant, None) is not None:
                n += 1
            n += len(self._previous.pop(tenant, []))
        folder = self.root / tenant_key(tenant)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        if self.client is not None:
            self.client.send(("forget", tenant))
        for cap in self._captures.values():
            if cap.tenant == tenant:
                cap.private = True  # what is in flight is not sent either
        return n

    def on_policy_update(self, version: int) -> None:
        """New target weights: the trainer drops traffic of the old ones, and requests in flight (still on
        the old weights) are not sent; their features are the old policy's."""
        for cap in self._captures.values():
            cap.private = True
        if self.client is not None:
            self.client.send(("policy_update",))

    def state_dict(self) -> dict[str, Any]:
        """Which version each tenant serves (the weights themselves live under ``root``)."""
        return {"root": str(self.root), "versions": {t: v for t, (v, _) in self._current.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Versions are read from ``root`` at construction; a snapshot only has to be well formed.

        Raises:
            ValueError: a snapshot that is not this speculator's.
        """
        if state and not isinstance(state.get("versions"), dict):
            raise ValueError("not a learned_head snapshot (no 'versions')")

    def online_stats(self) -> dict[str, Any]:
        """What the dashboard and ``/metrics`` show: versions, trainer state, live acceptance."""
        last = self.rounds[-1] if self.rounds else None
        live = {f"{t}:v{v}": {"drafted": s.drafted, "accepted": s.accepted} for (t, v), s in self._vstats.items()}
        return {
            "trainer_alive": bool(self.client is not None and self.client.alive),
            "docs_sent": self.docs_sent,
            "published": self.published,
            "rollbacks": self.rollbacks,
            "versions": {t: v for t, (v, _) in self._current.items()},
            "vocab_adapted": {t: int((rt.draft_to_target != self._static_float.draft_to_target).sum())
                              for t, (_, rt) in self._current.items()},
            "last_round": last,
            "live": live,
            "errors": list(self.client.errors) if self.client is not None else [],
            "restored_buffers": self.restored_buffers,
        }

    def close(self) -> None:
        """Stop the trainer; remove a temporary versions folder."""
        if self.client is not None:
            self.client.close()
        if self._temporary_root:
            shutil.rmtree(self.root, ignore_errors=True)


def load_learned_speculator(target: Any, state_dir: Optional[str | Path] = None,
                            config: Optional[OnlineConfig] = None, train: bool = True,
                            draft_before_first_version: bool = False, int8: bool = True) -> LearnedHeadSpeculator:
    """The learned-head speculator for a loaded target, from its shipped static head and replay data.

    Args:
        target: a loaded target model (``adaspec.target.TargetModel``).
        state_dir: where versions persist (``<state_dir>/learned_head``); None: a temporary folder.
        config: the trainer's settings.
        train: run the background trainer.
        draft_before_first_version: see :class:`LearnedHeadSpeculator`.

    Raises:
        FileNotFoundError: no shipped static head for this target.
        ValueError: the static head does not fit the target.
    """
    from adaspec.online.trainer import shipped_replay_path
    from adaspec.speculators.draft_head import (check_matches_target, load_draft_head, shipped_checkpoint_path,
                                                target_embedding_weight, target_lm_head_weight)

    path = shipped_checkpoint_path(str(target.name))
    net, _ = load_draft_head(path)
    check_matches_target(net, target)
    replay = shipped_replay_path(str(target.name))
    root = Path(state_dir) / "learned_head" if state_dir else None
    embed = target_embedding_weight(target).float()
    lm_head = None
    probe = net.draft_to_target[:64]
    if not torch.equal(net.lm_head[:64], embed[probe].to(torch.float16).float()):
        # the static head's rows are not the (tied) embeddings': reassigned draft ids take the LM head's
        lm_head = target_lm_head_weight(target)
        if lm_head is None and (config or OnlineConfig()).vocab_slots:
            log.info("learned head: the target's LM head is not a dense tensor; the draft vocabulary stays the static one")
            config = dataclasses.replace(config or OnlineConfig(), vocab_slots=0)
    return LearnedHeadSpeculator(net, embed, path, root=root, config=config,
                                 replay_path=replay if replay.is_file() else None, train=train,
                                 draft_before_first_version=draft_before_first_version, int8=int8,
                                 lm_head_weight=lm_head)
