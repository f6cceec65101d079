"""Start and drive a vLLM engine in vLLM's own virtual environment (:mod:`adaspec.integrations.vllm_runner`).

adaspec and vLLM's CPU build pin different torch and transformers versions, so
vLLM lives in its own environment (``make vllm``: ``.venv-vllm``) and adaspec
reaches it through a child process speaking JSON lines. Which Python runs it:

1. ``python`` given to :class:`VllmWorker` (``--vllm-python`` on the CLI);
2. ``$ADASPEC_VLLM_PYTHON``;
3. ``.venv-vllm/bin/python`` in the current directory or beside the running
   interpreter's environment (the layout ``make vllm`` creates).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

VLLM_PYTHON_ENV = "ADASPEC_VLLM_PYTHON"
VLLM_VENV = ".venv-vllm"
DEFAULT_KV_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE unless set
START_TIMEOUT_S = 900.0  # model load (eager: ~1 min on 2 cores; with --compile several)


class VllmUnavailable(RuntimeError):
    """No vLLM environment was found, or its engine did not start (the message says which)."""


def find_vllm_python(python: Optional[str] = None) -> Path:
    """The Python of vLLM's environment (see the module docstring for the order).

    Raises:
        VllmUnavailable: none found, or the one named does not exist.
    """
    named = python or os.environ.get(VLLM_PYTHON_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.exists():
            raise VllmUnavailable(f"vLLM python {path} does not exist")
        return path
    roots = [Path.cwd(), Path(sys.prefix).resolve().parent]
    for root in roots:
        path = root / VLLM_VENV / "bin" / "python"
        if path.exists():
            return path
    raise VllmUnavailable(f"no vLLM environment: run `make vllm` (creates {VLLM_VENV}/) or set {VLLM_PYTHON_ENV}")


class VllmWorker:
    """One vLLM ``LLM`` engine (float32, CPU) in a child process.

    Args:
        model_dir: HF model folder (config.json, safetensors, tokenizer).
        method: a :data:`adaspec.integrations.vllm_runner.METHODS` name.
        k: speculative tokens per step. Default 8.
        max_model_len: context window. Default 2048.
        max_num_seqs: vLLM's batch cap (0: vLLM's default).
        num_kv_blocks: KV cache blocks (0: from ``VLLM_CPU_KVCACHE_SPACE``; 1 GiB unless set).
        env: extra environment for the child (e.g. ``ADASPEC_STATE_DIR``).
        python: vLLM's Python (see :func:`find_vllm_python`).
        threads: ``OMP_NUM_THREADS`` for the child. Default 1.

    Raises:
        VllmUnavailable: no vLLM environment, or the engine exited or did not
            report ready within ``START_TIMEOUT_S`` (the message ends with its
            last stderr lines).
    """

    def __init__(self, model_dir: str | Path, method: str = "plain", k: int = 8, max_model_len: int = 2048,
                 max_num_seqs: int = 0, num_kv_blocks: int = 0, env: Optional[dict[str, str]] = None,
                 python: Optional[str] = None, threads: int = 1) -> None:
        py = find_vllm_python(python)
        src = str(Path(__file__).resolve().parents[2])  # this checkout's adaspec, whatever vLLM's env has
        # 1 GiB of KV cache (~23k tokens of this model) per engine: a benchmark keeps several
        # engines alive at once, and each costs ~1.5 GB besides (2 GiB each ran out of 24 GB).
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE":
                     os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_GIB), **(env or {})}
        child_env["PYTHONPATH"] = src + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
        cmd = [str(py), "-m", "adaspec.integrations.vllm_runner", "--model", str(model_dir), "--method", method,
               "--k", str(k), "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
               "--num-kv-blocks", str(num_kv_blocks)]
        self.method = method
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=child_env, start_new_session=True)
        self.stderr_tail: deque[str] = deque(maxlen=40)
        threading.Thread(target=self._drain, daemon=True).start()
        ready = self._read(START_TIMEOUT_S)
        if not ready or not ready.get("ready"):
            self.close()
            raise VllmUnavailable(f"vLLM ({method}) did not start:\n" + "".join(self.stderr_tail))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line)

    def _read(self, timeout_s: float) -> Optional[dict[str, Any]]:
        assert self.proc.stdout is not None
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout_s)
        if not box or not box[0]:
            return None
        return json.loads(box[0])

    def request(self, payload: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
        """Send one request and wait for its reply.

        Raises:
            VllmUnavailable: the engine died or did not answer in ``timeout_s``
                (the message ends with its last stderr lines).
            ValueError: the engine refused the request (its error message).
        """
        if self.proc.poll() is not None:
            raise VllmUnavailable(f"vLLM ({self.method}) exited with {self.proc.returncode}:\n"
                                  + "".join(self.stderr_tail))
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout_s)
        if reply is None:
            raise VllmUnavailable(f"vLLM ({self.method}) gave no reply in {timeout_s:.0f} s:\n"
                                  + "".join(self.stderr_tail))
        if not reply.get("ok"):
            error = reply.get("error", "vLLM refused the request")
            if "EngineDead" in error or self.proc.poll() is not None:  # the cause is in vLLM's log
                raise VllmUnavailable(f"vLLM ({self.method}) failed: {error}\n" + "".join(self.stderr_tail))
            raise ValueError(error)
        return reply

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int] = 64,
                 temperature: float = 0.0, seed: Optional[int] = None,
                 logprobs: Optional[int] = None) -> dict[str, Any]:
        """One ``LLM.generate`` over ``prompts`` (all in flight together); the reply as documented in the runner."""
        return self.request({"cmd": "generate", "prompts": [list(map(int, p)) for p in prompts],
                             "max_tokens": list(max_tokens) if not isinstance(max_tokens, int) else max_tokens,
                             "temperature": temperature, "seed": seed, "logprobs": logprobs})

    def sleep(self, seconds: float) -> None:
        """Let the engine sit idle (its proposer's snapshot thread runs)."""
        self.request({"cmd": "sleep", "seconds": seconds}, timeout_s=seconds + 60)

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask the engine to quit; kill its process group if it does not."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        # vLLM's own children (engine core, worker) share the session: leave none behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "VllmWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
