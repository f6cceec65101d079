"""OpenAI-compatible HTTP server: API, engine scheduler, metrics and dashboard.

``create_app(engine)`` builds the FastAPI app; ``adaspec serve`` runs it
(:mod:`adaspec.server.main`).
"""

from adaspec.server.app import create_app
from adaspec.server.main import add_serve_arguments, load_api_keys, serve_from_args

__all__ = ["create_app", "add_serve_arguments", "load_api_keys", "serve_from_args"]
