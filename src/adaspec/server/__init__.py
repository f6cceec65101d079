"""OpenAI-compatible HTTP server: API, engine scheduler, metrics and dashboard.

``create_app(engine)`` builds the FastAPI app; ``adaspec serve`` runs it
(:mod:`adaspec.server.main`). The names below load on first use, so that code
importing a light submodule (``adaspec.server.tools``, say, from a benchmark or
the CLI's parser) does not pay for FastAPI and uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"create_app": "adaspec.server.app", "add_serve_arguments": "adaspec.server.main",
         "load_api_keys": "adaspec.server.main", "serve_from_args": "adaspec.server.main"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
