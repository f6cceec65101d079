"""``adaspec serve``: command-line options, API keys, and running the app with uvicorn.

Run::

    adaspec serve --model smollm2-135m-instruct --port 8000
    # then any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    # dashboard: http://127.0.0.1:8000/dashboard   metrics: /metrics

API keys (``--api-keys`` or env ``ADASPEC_API_KEYS``): ``"key1:tenantA,key2:tenantB"``
(a key without ``:tenant`` maps to the default tenant), or the path of a JSON
or TOML file holding ``{"key1": "tenantA", ...}`` (optionally under a ``keys``
table, or as a list of ``{"key": ..., "tenant": ...}``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from adaspec import config
from adaspec.server.snapshots import DEFAULT_SNAPSHOT_INTERVAL_S, DEFAULT_SNAPSHOT_TOKENS
from adaspec.types import DEFAULT_TENANT

API_KEYS_ENV = "ADASPEC_API_KEYS"
ADMIN_KEY_ENV = "ADASPEC_ADMIN_KEY"
_DURATION_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_ACTIVE = 16
DEFAULT_PREFIX_CACHE_TOKENS = 8192  # KV positions cached prefixes may hold (LRU beyond)
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens prefilled per batched step
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (engine options and defaults from :mod:`adaspec.config`)."""
    config.add_model_arguments(parser)
    config.add_speculator_arguments(parser, "directory for learned-state snapshots (loaded at start, saved at "
                                            "shutdown)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--served-model-name", default=None, help="model id for clients (default: --model)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests that may wait for a slot before 429 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--max-active", type=int, default=DEFAULT_MAX_ACTIVE,
                        help=f"requests decoded at once, in one batched forward per step (continuous batching; "
                        f"default {DEFAULT_MAX_ACTIVE})")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help="most prompt tokens prefilled per batched step, over all new requests: bounds the "
                        f"others' inter-token latency (default {DEFAULT_PREFILL_CHUNK})")
    parser.add_argument("--prefix-cache-tokens", type=int, default=DEFAULT_PREFIX_CACHE_TOKENS,
                        help="KV positions the prefix cache may hold (cached prompt prefixes, per tenant, LRU "
                        f"eviction); 0 turns prefix reuse off (default {DEFAULT_PREFIX_CACHE_TOKENS})")
    parser.add_argument("--shared-prefix-cache", action="store_true",
                        help="one prefix cache for all tenants (opt-in: a shared cache is a timing side channel "
                        "between tenants)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds per request; 0 for none; a cut request finishes with 'length' "
                        f"(default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                        help="seconds in-flight requests may finish at shutdown before they are cut "
                        f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    parser.add_argument("--api-keys", default=None,
                        help=f"'key:tenant,...' or a JSON/TOML file (default: env {API_KEYS_ENV}; none: open)")
    parser.add_argument("--snapshot-interval", type=float, default=DEFAULT_SNAPSHOT_INTERVAL_S,
                        help="with --state-dir: seconds between snapshots while something was learned; 0: only "
                        f"at shutdown (default {DEFAULT_SNAPSHOT_INTERVAL_S:g})")
    parser.add_argument("--snapshot-tokens", type=int, default=DEFAULT_SNAPSHOT_TOKENS,
                        help="with --state-dir: also snapshot after this many new prompt + generated tokens; 0: "
                        f"off (default {DEFAULT_SNAPSHOT_TOKENS})")
    parser.add_argument("--admin-key", default=None,
                        help=f"bearer token of the admin endpoints (default: env {ADMIN_KEY_ENV}; none: disabled)")
    parser.add_argument("--state-retention", default=None, type=parse_duration_s,
                        help="drop learned sequences older than this: seconds, or a number with s/m/h/d "
                        "(e.g. 30d); default: keep until evicted by the size bounds")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def parse_duration_s(text: str) -> float:
    """Seconds from ``"3600"``, ``"90s"``, ``"15m"``, ``"12h"`` or ``"30d"``.

    Raises:
        ValueError: not a positive duration (argparse reports it as a usage error).
    """
    t = str(text).strip().lower()
    scale = _DURATION_UNITS_S.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 90s, 15m, 12h, 30d)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"a duration must be > 0, got {text!r}")
    return value


def load_api_keys(spec: Optional[str]) -> dict[str, str]:
    """API key -> tenant from ``"k1:tA,k2:tB"`` or a JSON / TOML file path.

    Raises:
        ValueError: an empty key or tenant, or a file of the wrong shape.
    """
    if spec is None or not spec.strip():
        return {}
    path = Path(spec.strip())
    if path.suffix.lower() in (".json", ".toml") or path.is_file():
        return _keys_from_file(path)
    keys: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.partition(":")
        key, tenant = key.strip(), tenant.strip() if sep else DEFAULT_TENANT
        if not key or not tenant:
            raise ValueError(f"API key entry {item!r}: expected 'key:tenant'")
        keys[key] = tenant
    return keys


def _keys_from_file(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        import tomllib

        data: Any = tomllib.loads(text)
    else:
        data = json.loads(text)
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    if isinstance(data, list):
        try:
            data = {d["key"]: d["tenant"] for d in data}
        except (TypeError, KeyError):
            raise ValueError(f"{path}: a list of keys needs {{'key': ..., 'tenant': ...}} entries") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                             for k, v in data.items()):
        raise ValueError(f"{path}: expected a mapping of API key -> tenant (non-empty strings)")
    return dict(data)


def serve_from_args(args: argparse.Namespace) -> None:
    """Run the server until interrupted (Ctrl-C drains in-flight requests, then saves learned state)."""
    import uvicorn

    from adaspec.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = load_api_keys(args.api_keys if args.api_keys is not None else os.environ.get(API_KEYS_ENV))
    cfg = config.config_from_args(args)
    log = logging.getLogger("adaspec.server")
    app = create_app(
        lambda: config.build_engine(cfg, log=log.info),
        args.served_model_name or cfg.model,
        api_keys=keys,
        max_queue=args.max_queue,
        max_active=args.max_active,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_tokens=args.prefix_cache_tokens,
        shared_prefix_cache=args.shared_prefix_cache,
        request_timeout_s=args.request_timeout or None,
        state_store=config.open_store(cfg.state_dir),
        drain_timeout_s=args.shutdown_timeout,
        snapshot_interval_s=args.snapshot_interval,
        snapshot_tokens=args.snapshot_tokens,
        admin_key=args.admin_key if args.admin_key is not None else os.environ.get(ADMIN_KEY_ENV),
        state_retention_s=args.state_retention,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)))


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m adaspec.server.main``: the same as ``adaspec serve``."""
    parser = argparse.ArgumentParser(prog="adaspec serve", description="OpenAI-compatible adaspec server")
    add_serve_arguments(parser)
    serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
