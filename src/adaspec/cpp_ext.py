"""Build once and load the project's C++ extensions, safe against crashed builds.

``torch.utils.cpp_extension.load`` guards its build directory with a lock *file*
(``FileBaton``) that it creates on every load, built or not, and that only a
clean exit removes. A process killed while loading (a SIGKILLed server, a test
run stopped at its time limit) leaves that file behind, and every later load
waits on it forever. Here:

- a finished build is marked by a ``.complete`` file written after torch's
  build returns; with the marker and the ``.so`` present the module is imported
  straight from the ``.so`` (no lock, no ninja run: start-up stays fast);
- a build takes an ``fcntl.flock`` on ``.adaspec-build-lock``, which the kernel
  releases when its holder dies, and with that held removes any ``lock`` file a
  dead torch build left before calling torch.

Build directories are keyed by a digest of sources and flags (the callers'
``name``), so a stale build is never loaded.
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

_MARKER = ".complete"
_FLOCK = ".adaspec-build-lock"


def _put_ninja_on_path() -> None:
    """The PyPI ``ninja`` package puts its binary beside the venv's python, not on PATH."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _import_built(name: str, so_path: Path) -> ModuleType:
    import torch  # noqa: F401  (the extension links against libtorch, loaded by importing torch)

    loader = importlib.machinery.ExtensionFileLoader(name, str(so_path))
    spec = importlib.util.spec_from_file_location(name, str(so_path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build_and_load(name: str, build_dir: Path, build: Callable[[str], ModuleType],
                   what: str = "C++ kernel") -> ModuleType:
    """The extension ``name``, built into ``build_dir`` on first use.

    Args:
        name: the extension's module name (include a digest of sources and flags).
        build_dir: its build directory (created if missing).
        build: called with ``str(build_dir)`` when no finished build exists; it calls
            ``torch.utils.cpp_extension.load`` / ``load_inline`` with that
            ``build_directory`` and returns the module.
        what: named in the one-line progress message printed before a build.

    Raises:
        whatever ``build`` raises (no compiler, no ninja, a compile error).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    so_path = build_dir / f"{name}.so"
    if (build_dir / _MARKER).exists() and so_path.exists():
        return _import_built(name, so_path)
    _put_ninja_on_path()
    with open(build_dir / _FLOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            if (build_dir / _MARKER).exists() and so_path.exists():  # another process built it
                return _import_built(name, so_path)
            stale = build_dir / "lock"  # torch's FileBaton; no live adaspec build holds it now
            if stale.exists():
                stale.unlink()
            print(f"adaspec: building the {what} (once per machine; a minute or two)...",
                  file=sys.stderr, flush=True)
            module = build(str(build_dir))
            (build_dir / _MARKER).write_text("built\n")
            return module
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def extension_dir(name: str) -> Path:
    """``<adaspec cache>/torch_extensions/<name>``."""
    from adaspec.models import cache_root

    return cache_root() / "torch_extensions" / name
