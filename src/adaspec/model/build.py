"""Build (once per machine and source version) and load the lean C++ kernels.

The sources live in ``kernels/*.cpp`` beside this file; they are compiled with
``torch.utils.cpp_extension.load`` (g++ and ninja; the PyPI ``ninja`` package
is put on PATH) into ``<adaspec cache>/torch_extensions/<name>_<digest>``, the
digest covering the sources and flags, so an edited kernel is rebuilt and a
stale build is never loaded. :mod:`adaspec.cpp_ext` does the build and load
(crash-safe locking; a finished build is imported without running ninja).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

KERNEL_DIR = Path(__file__).parent / "kernels"
# -fopenmp: at::parallel_for is inline OpenMP in the headers; compiled without it, the
# GEMM's output tiles were never split across threads. The extension links libgomp.so.1,
# which resolves to the copy torch already loaded (one OpenMP runtime per process).
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-std=c++17", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
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
            from adaspec.cpp_ext import build_and_load, extension_dir

            sources = sorted(KERNEL_DIR.glob("*.cpp"))
            h = hashlib.sha256(" ".join(_CFLAGS).encode())
            for src in sources:
                h.update(src.read_bytes())
            name = f"adaspec_lean_{h.hexdigest()[:12]}"

            def build(build_dir: str):
                # imported only to build: torch.utils.cpp_extension pulls in setuptools (~0.07 s of start-up)
                from torch.utils.cpp_extension import load

                return load(name=name, sources=[str(s) for s in sources], extra_cflags=_CFLAGS,
                            extra_ldflags=_LDFLAGS, build_directory=build_dir, verbose=False)

            module = build_and_load(name, extension_dir(name), build, what="lean core's C++ kernel")
        except Exception as exc:  # no compiler, no ninja, no AVX2, a compile error ...
            error = f"{type(exc).__name__}: {exc}"
        _STATE.update(module=module, error=error)
    if _STATE["module"] is None:
        raise RuntimeError(f"lean kernel unavailable: {_STATE['error']}")
    return _STATE["module"]


def kernel_error() -> Optional[str]:
    """Why :func:`lean_kernel` failed (None if it has not, or has not been tried)."""
    return _STATE.get("error")
