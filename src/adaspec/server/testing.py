"""Run the app with a real uvicorn server on a background thread (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(engine, "m")) as server:
        OpenAI(base_url=server.base_url + "/v1", api_key="x")...
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Optional


class BackgroundServer:
    """uvicorn on a free loopback port in a daemon thread; a context manager.

    Args:
        app: the ASGI app (its lifespan runs: the engine worker starts and stops).
        host: bind address. Default 127.0.0.1.
        startup_timeout_s: how long ``__enter__`` waits for the lifespan start-up.

    Raises:
        RuntimeError: from ``__enter__`` if the server did not start in time.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 120.0,
                 timeout_graceful_shutdown: Optional[int] = 5) -> None:
        import uvicorn

        self.app = app
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))  # bound before the thread starts: the port cannot be taken meanwhile
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start (see the log for the lifespan error)")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Ask uvicorn to exit (graceful: lifespan shutdown runs) and wait for the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
