"""Build (once per machine and source version) and load the lean C++ kernels.

The sources live in ``kernels/*.cpp`` beside this file; they are compiled with
``torch.utils.cpp_extension.load`` (g++ and ninja; the PyPI ``ninja`` package
is put on PATH) into ``<adaspec cache>/torch_extensions/<name>_<digest>``, the
digest covering the sources and flags, so an edited kernel is rebuilt and a
stale build is never loaded.
"""

from __future__ import annotations

import sys
import hashlib
import os
from pathlib import Path
from typing import Optional

import torch

KERNEL_DIR = Path(__file__).parent / "kernels"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-std=c++17"]
_STATE: dict = {}  # "module": the loaded extension or None, "error": why it is None


def lean_kernel():
    """The compiled ``lean`` extension module.

    Raises:
        RuntimeError: the CPU lacks AVX2, or the build failed (the message says why).
    """
    if "module" not in _STATE:
        module, error = None, None
        try:
            if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
                raise RuntimeError(f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2")
            try:  # the PyPI `ninja` package puts its binary beside the venv's python
                import ninja

                if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
                    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
            from torch.utils.cpp_extension import load

            from adaspec.models import cache_root

            sources = sorted(KERNEL_DIR.glob("*.cpp"))
            h = hashlib.sha256(" ".join(_CFLAGS).encode())
            for src in sources:
                h.update(src.read_bytes())
            name = f"adaspec_lean_{h.hexdigest()[:12]}"
            build_dir = cache_root() / "torch_extensions" / name
            build_dir.mkdir(parents=True, exist_ok=True)
            if not any(build_dir.glob("*.so")):
                print("adaspec: building the lean core's C++ kernel (once per machine; a minute or two)...",
                      file=sys.stderr, flush=True)
            module = load(name=name, sources=[str(s) for s in sources], extra_cflags=_CFLAGS,
                          build_directory=str(build_dir), verbose=False)
        except Exception as exc:  # no compiler, no ninja, no AVX2, a compile error ...
            error = f"{type(exc).__name__}: {exc}"
        _STATE.update(module=module, error=error)
    if _STATE["module"] is None:
        raise RuntimeError(f"lean kernel unavailable: {_STATE['error']}")
    return _STATE["module"]


def kernel_error() -> Optional[str]:
    """Why :func:`lean_kernel` failed (None if it has not, or has not been tried)."""
    return _STATE.get("error")
