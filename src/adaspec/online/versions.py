"""Versioned, crash-safe publication of learned draft heads, one folder per tenant.

Layout under a root folder::

    ROOT/<tenant key>/v000003.safetensors   # the trainable weights of version 3
    ROOT/<tenant key>/current.json          # {"version": 3, "file": "v000003.safetensors", ...}

A version file holds only the head's trained tensors (norms, ``fc_in``,
``match_embed``, the blocks); the frozen draft LM-head rows and
``draft_to_target`` come from the static head the version was trained from,
whose digest the file records, except for the draft ids the trainer
reassigned (its adapted draft vocabulary): ``vocab_slots`` ``[m]`` int64,
``vocab_tokens`` ``[m]`` int64 (their target ids) and ``vocab_rows``
``[m, H]`` float16 (their LM-head rows). Publication writes the version file (temporary
name, fsync, rename, fsync of the folder), then replaces ``current.json`` the
same way, so a crash at any point leaves ``current.json`` naming a complete
file: the last good version. Older versions are kept (``keep`` newest) for
rollback.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from adaspec.speculators.draft_head import DraftHeadNet
from adaspec.store import write_atomic

FILE_MODE = 0o600

LEARNED_FORMAT = "adaspec.learned_head"
LEARNED_VERSION = 1
CURRENT_FILE = "current.json"
FROZEN_TENSORS = ("lm_head", "draft_to_target")  # taken from the static head, never stored
_VERSION_RE = re.compile(r"^v(\d{6})\.safetensors$")


def tenant_key(tenant: str) -> str:
    """A file-system-safe, collision-free folder name for ``tenant``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tenant)[:40].lstrip(".-") or "t"
    return f"{safe}-{hashlib.sha256(tenant.encode('utf-8')).hexdigest()[:12]}"


def head_digest(net: DraftHeadNet) -> str:
    """Digest of a head's frozen part (config, draft vocabulary, LM-head rows): what a version must match."""
    h = hashlib.sha256(json.dumps(net.config.__dict__, sort_keys=True).encode("utf-8"))
    h.update(net.draft_to_target.numpy().tobytes())
    h.update(net.lm_head.to(torch.float16).numpy().tobytes())
    return h.hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder; 0600 (learned weights come from users' traffic, as snapshots)."""
    write_atomic(path, data, FILE_MODE)


def trained_state(net: DraftHeadNet) -> dict[str, torch.Tensor]:
    """The head's trained tensors (everything but :data:`FROZEN_TENSORS`), float32 copies."""
    return {k: v.detach().float().clone() for k, v in net.state_dict().items() if k not in FROZEN_TENSORS}


VOCAB_TENSORS = ("vocab_slots", "vocab_tokens", "vocab_rows")


def vocabulary_changes(net: DraftHeadNet, base: DraftHeadNet) -> dict[str, torch.Tensor]:
    """The draft ids whose token ``net`` changed from ``base``'s, as the :data:`VOCAB_TENSORS` (empty: none)."""
    slots = (net.draft_to_target != base.draft_to_target).nonzero().flatten()
    if slots.numel() == 0:
        return {}
    return {"vocab_slots": slots.long().contiguous(), "vocab_tokens": net.draft_to_target[slots].long().contiguous(),
            "vocab_rows": net.lm_head[slots].to(torch.float16).contiguous()}


def publish(root: str | Path, tenant: str, net: DraftHeadNet, base_digest: str, info: Optional[dict] = None,
            keep: int = 3, base: Optional[DraftHeadNet] = None) -> int:
    """Write ``net``'s trained tensors as ``tenant``'s next version and make it current.

    Args:
        root: the learned-heads folder (created if missing).
        tenant: whose version this is.
        net: the trained head.
        base_digest: :func:`head_digest` of the static head it was trained from.
        info: JSON-serialisable notes (held-out evaluation, positions trained on).
        keep: versions kept on disk (the newest), >= 2 so a rollback has a target.
        base: that static head, to store the draft ids ``net`` reassigned (None: ``net``
            keeps the static draft vocabulary).

    Returns:
        the new version number (1 for the first).

    Raises:
        OSError: the write failed; the previous version stays current.
    """
    from safetensors.torch import save

    folder = Path(root) / tenant_key(tenant)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    versions = list_versions(root, tenant)
    version = (max(versions) if versions else 0) + 1
    name = f"v{version:06d}.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in trained_state(net).items()}
    if base is not None:
        tensors.update(vocabulary_changes(net, base))
    meta = {"format": LEARNED_FORMAT, "version": str(LEARNED_VERSION), "base": base_digest,
            "tenant": tenant, "head_version": str(version)}
    _write_atomic(folder / name, save(tensors, metadata=meta))
    current = {"version": version, "file": name, "base": base_digest, "tenant": tenant, "info": info or {}}
    _write_atomic(folder / CURRENT_FILE, json.dumps(current, sort_keys=True).encode("utf-8"))
    for old in sorted(versions)[: max(0, len(versions) + 1 - max(2, keep))]:
        (folder / f"v{old:06d}.safetensors").unlink(missing_ok=True)
    return version


def set_current(root: str | Path, tenant: str, version: int, info: Optional[dict] = None) -> None:
    """Make an existing version current again (a rollback).

    Raises:
        FileNotFoundError: no such version on disk.
    """
    folder = Path(root) / tenant_key(tenant)
    name = f"v{version:06d}.safetensors"
    if not (folder / name).is_file():
        raise FileNotFoundError(f"tenant {tenant!r} has no learned-head version {version} in {folder}")
    old = read_current(root, tenant) or {}
    current = {"version": version, "file": name, "base": old.get("base", ""), "tenant": tenant,
               "info": info or {}}
    _write_atomic(folder / CURRENT_FILE, json.dumps(current, sort_keys=True).encode("utf-8"))


def list_versions(root: str | Path, tenant: str) -> list[int]:
    """Version numbers of ``tenant`` on disk, ascending."""
    folder = Path(root) / tenant_key(tenant)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name)))


def read_current(root: str | Path, tenant: str) -> Optional[dict[str, Any]]:
    """``tenant``'s ``current.json`` (None when there is none or it is unreadable)."""
    path = Path(root) / tenant_key(tenant) / CURRENT_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("version"), int) else None


def load_version(root: str | Path, tenant: str, version: int, base: DraftHeadNet) -> DraftHeadNet:
    """``tenant``'s version ``version`` as a float32 head (frozen tensors from ``base``, with the
    version's reassigned draft ids).

    Raises:
        FileNotFoundError: no such version.
        ValueError: not a learned-head file, or trained from another static head.
    """
    import copy

    from safetensors import safe_open

    path = Path(root) / tenant_key(tenant) / f"v{version:06d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no learned-head version {version} for tenant {tenant!r} at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != LEARNED_FORMAT or meta.get("version") != str(LEARNED_VERSION):
            raise ValueError(f"{path} is not a learned-head version file")
        if meta.get("base") != head_digest(base):
            raise ValueError(f"{path} was trained from another static head (base {meta.get('base')!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    vocab = {k: state.pop(k) for k in VOCAB_TENSORS if k in state}
    state = {k: v.float() for k, v in state.items()}
    net = copy.deepcopy(base)
    missing = set(trained_state(net)) - set(state)
    if missing:
        raise ValueError(f"{path} lacks tensors {sorted(missing)}")
    net.load_state_dict({**net.state_dict(), **state})
    if vocab:
        slots, tokens, rows = (vocab.get(k) for k in VOCAB_TENSORS)
        Vd, V = int(net.draft_to_target.numel()), int(net.config.target_vocab_size)
        if (slots is None or tokens is None or rows is None or slots.dim() != 1 or tokens.shape != slots.shape
                or tuple(rows.shape) != (slots.numel(), net.config.hidden_size)
                or (slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= Vd
                                       or int(tokens.min()) < 0 or int(tokens.max()) >= V))):
            raise ValueError(f"{path} has a malformed draft-vocabulary change")
        net.draft_to_target[slots.long()] = tokens.long()
        net.lm_head[slots.long()] = rows.to(net.lm_head.dtype)
        if torch.unique(net.draft_to_target).numel() != Vd:
            raise ValueError(f"{path} maps two draft ids to one token")
    return net.eval()
