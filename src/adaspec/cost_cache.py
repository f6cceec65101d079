"""On-disk cache of the controller's measured verify-cost tables (once per model, machine and build).

:func:`adaspec.config.calibrated_cost_model` times forwards of 1..17 tokens and
batched forwards of 17..128 rows before the controller starts: about 3 s on an
AVX-512 VNNI core, more than 20 s on a core whose int8 multiply-adds are slow (a
verify row there costs what a prefill row does). Those tables depend on the
model, the machine and the build, not on the run, so they are measured once and
kept under ``<adaspec cache>/costs/<key>.json``; each controller's
:class:`~adaspec.controller.CostModel` still rescales them from its own forwards
as it runs (a busier machine, another thread count chosen later).

The key covers the model (name, dtype, runtime, vocabulary, the int8 model file),
the CPU (model name, instruction-set flags, cores), the torch version and intra-op
thread count at measurement, the lean kernel's build (its source digest) and what
is measured (token and row counts, repeats). Set ``ADASPEC_COST_CACHE=0`` to
measure at every start. At most :data:`MAX_FILES` files are kept (least recently
used go first); an unreadable file is measured again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

COST_CACHE_VERSION = "1"
MAX_FILES = 32
ENV = "ADASPEC_COST_CACHE"


def enabled() -> bool:
    """False when ``$ADASPEC_COST_CACHE`` is 0, false, no or off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_identity() -> str:
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = value.strip()
                if name and flags:
                    break
    except OSError:
        pass
    name = name or platform.processor()
    return f"{platform.machine()}|{name}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}|{os.cpu_count()}"


def _kernel_identity(target: Any) -> str:
    if getattr(target, "runtime", "transformers") != "lean":
        return "transformers"
    try:
        from adaspec.model.build import lean_kernel

        return str(getattr(lean_kernel(), "__name__", "lean"))
    except Exception:  # no kernel: nothing lean can have been measured
        return "lean"


def cache_key(target: Any, what: dict) -> str:
    """The key of ``target``'s cost tables measured as ``what`` describes, on this machine and thread count."""
    import torch

    report = getattr(target, "quant_report", None) or {}
    parts = {
        "version": COST_CACHE_VERSION,
        "model": str(getattr(target, "name", "")),
        "dtype": str(getattr(target, "dtype", "")),
        "runtime": str(getattr(target, "runtime", "transformers")),
        "vocab": int(getattr(target, "vocab_size", 0) or 0),
        "weights": str(report.get("cache", "")) or str(getattr(getattr(target, "model", None), "name_or_path", "")),
        "attention": str(report.get("attention_kernel", "")),
        "cpu": _cpu_identity(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernel": _kernel_identity(target),
        "kv_dtype": str(getattr(getattr(getattr(target, "decoder", None), "pool", None), "dtype", "")),
        "what": what,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    from adaspec.models import cache_root

    return cache_root() / "costs"


def load_json(key: str) -> Optional[dict]:
    """The JSON object stored under ``key``, or None (absent, unreadable, not an object, or the cache off)."""
    if not enabled():
        return None
    path = cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again, then replace it
        return None
    if not isinstance(data, dict):
        return None
    try:
        os.utime(path)  # least recently used goes first
    except OSError:
        pass
    return data


def save_json(key: str, body: dict) -> None:
    """Store ``body`` under ``key`` (atomic: write, fsync, rename) with the time and load average of the
    measurement; a full or read-only disk is not an error."""
    if not enabled():
        return
    from adaspec.store import write_atomic

    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        body = dict(body, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
        write_atomic(d / f"{key}.json", json.dumps(body).encode(), mode=0o644)
        files = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in files[:-MAX_FILES]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def load(key: str) -> Optional[dict]:
    """The stored tables for ``key`` (``{"verify_ms": {k: ms}, "batch_ms": {rows: ms} or None}``), or None."""
    data = load_json(key)
    if data is None:
        return None
    try:
        verify = {int(k): float(v) for k, v in data["verify_ms"].items()}
        batch = data.get("batch_ms")
        batch = {int(k): float(v) for k, v in batch.items()} if batch else None
        if not verify or any(v <= 0 for v in verify.values()):
            raise ValueError("empty or non-positive table")
    except (ValueError, KeyError, TypeError, AttributeError):  # damaged: measure again, then replace it
        return None
    return {"verify_ms": verify, "batch_ms": batch}


def save(key: str, verify_ms: dict, batch_ms: Optional[dict]) -> None:
    """Store the tables for ``key`` (atomic: write, fsync, rename); a full or read-only disk is not an error."""
    save_json(key, {"verify_ms": {str(k): v for k, v in verify_ms.items()},
                    "batch_ms": {str(k): v for k, v in batch_ms.items()} if batch_ms else None})
