"""A vLLM engine in its own process, driven by JSON lines: how adaspec's benchmarks and tests reach vLLM.

vLLM's CPU build pins other versions of torch and transformers than adaspec
(``make vllm`` puts it in ``.venv-vllm``), so adaspec never imports vLLM in its
own interpreter. It starts this module under the vLLM environment's Python
instead::

    .venv-vllm/bin/python -m adaspec.integrations.vllm_runner \\
        --model ~/.cache/adaspec/models/smollm2-135m-instruct --method adaspec-suffix --k 8

and talks to it over stdin / stdout, one JSON object per line. vLLM's own
logging goes to stderr (file descriptor 1 is pointed at 2 at start), so stdout
carries only replies.

Requests:

- ``{"cmd": "generate", "prompts": [[ids...], ...], "max_tokens": int or [int...],
  "temperature": float, "seed": int or null, "logprobs": int or null}``: one
  ``LLM.generate`` call over all prompts (so they are in flight together).
  Reply: ``{"ok": true, "outputs": [{"token_ids": [...], "logprobs": [[[id, lp], ...], ...]
  or null, "finish_reason": str}], "seconds": float, "spec": {...}}`` where
  ``spec`` is the change in vLLM's speculative-decoding counters over the call
  (``num_drafts``, ``num_draft_tokens``, ``num_accepted_tokens``) and
  ``preemptions`` is the change in vLLM's preemption counter.
- ``{"cmd": "sleep", "seconds": float}``: wait (lets the proposer's snapshot
  thread run while idle). Reply ``{"ok": true}``.
- ``{"cmd": "quit"}``: shut down. End of input does the same.

A request that fails gets ``{"ok": false, "error": "..."}``; the engine stays up.

Methods (``--method``): ``plain`` (no speculation), ``ngram`` (vLLM's prompt
lookup, ``prompt_lookup_min`` 2 .. ``prompt_lookup_max`` 5), ``suffix``
(vLLM's own suffix decoding, needs ``arctic-inference``), ``adaspec-suffix``
(:class:`~adaspec.integrations.vllm_proposer.AdaspecSuffixProposer`) and
``adaspec-atlas`` (:class:`~adaspec.integrations.vllm_proposer.AdaspecAtlasProposer`),
all with ``--k`` speculative tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

METHODS = ("plain", "ngram", "suffix", "adaspec-suffix", "adaspec-atlas")
PROPOSERS = {
    "adaspec-suffix": "adaspec.integrations.vllm_proposer.AdaspecSuffixProposer",
    "adaspec-atlas": "adaspec.integrations.vllm_proposer.AdaspecAtlasProposer",
}
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
NGRAM_MIN, NGRAM_MAX = 2, 5


def speculative_config(method: str, k: int) -> Optional[dict[str, Any]]:
    """vLLM's ``speculative_config`` for ``method`` with ``k`` speculative tokens (None for plain).

    Raises:
        ValueError: an unknown method or ``k`` < 1.
    """
    if method not in METHODS:
        raise ValueError(f"unknown vLLM method {method!r}; choose from {', '.join(METHODS)}")
    if method == "plain":
        return None
    if k < 1:
        raise ValueError(f"need k >= 1 speculative tokens, got {k}")
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_min": NGRAM_MIN, "prompt_lookup_max": NGRAM_MAX}
    if method == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    return {"method": "custom_class", "model": PROPOSERS[method], "num_speculative_tokens": k}


def _counters(llm: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:")
        if name.startswith("spec_decode_") and name.removeprefix("spec_decode_") in SPEC_COUNTERS:
            out[name.removeprefix("spec_decode_")] = float(getattr(m, "value", 0))
        elif name == "num_preemptions":
            out["preemptions"] = float(getattr(m, "value", 0))
    return out


def _generate(llm: Any, req: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    prompts = req.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise ValueError("'prompts' must be a non-empty list of non-empty token id lists")
    max_tokens = req.get("max_tokens", 64)
    per = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    if len(per) != len(prompts):
        raise ValueError(f"{len(per)} max_tokens for {len(prompts)} prompts")
    params = [SamplingParams(max_tokens=int(m), temperature=float(req.get("temperature", 0.0)),
                             seed=req.get("seed"), logprobs=req.get("logprobs")) for m in per]
    before = _counters(llm)
    t0 = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": [int(t) for t in p]} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    after = _counters(llm)
    outputs = []
    for r in results:
        o = r.outputs[0]
        lps = None
        if o.logprobs is not None:
            lps = [[[int(t), float(lp.logprob)] for t, lp in sorted(pos.items(), key=lambda kv: -kv[1].logprob)]
                   for pos in o.logprobs]
        outputs.append({"token_ids": [int(t) for t in o.token_ids], "logprobs": lps,
                        "finish_reason": o.finish_reason})
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (*SPEC_COUNTERS, "preemptions")}
    return {"ok": True, "outputs": outputs, "seconds": seconds,
            "spec": {k: delta[k] for k in SPEC_COUNTERS}, "preemptions": delta["preemptions"]}


def serve(args: argparse.Namespace, reply_fd: int) -> int:
    from vllm import LLM

    kw: dict[str, Any] = {}
    spec = speculative_config(args.method, args.k)
    if spec is not None:
        kw["speculative_config"] = spec
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.num_kv_blocks:
        kw["num_gpu_blocks_override"] = args.num_kv_blocks
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, seed=0,
              enforce_eager=not args.compile, disable_log_stats=False, **kw)
    out = os.fdopen(reply_fd, "w", buffering=1)
    out.write(json.dumps({"ok": True, "ready": True, "method": args.method}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "quit":
                break
            if cmd == "sleep":
                time.sleep(float(req.get("seconds", 1.0)))
                reply: dict[str, Any] = {"ok": True}
            elif cmd == "generate":
                reply = _generate(llm, req)
            else:
                raise ValueError(f"unknown cmd {cmd!r}; expected generate, sleep or quit")
        except Exception as e:  # a bad request must not take the engine down
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
    out.close()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaspec.integrations.vllm_runner", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model folder (safetensors), e.g. from `adaspec models path`")
    p.add_argument("--method", default="plain", choices=METHODS)
    p.add_argument("--k", type=int, default=8, help="speculative tokens per step")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=0, help="vLLM's batch size cap (0: vLLM's default)")
    p.add_argument("--num-kv-blocks", type=int, default=0, help="KV blocks (0: sized from VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (minutes at start)")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; as vllm_client.DEFAULT_KV_GIB
    # Replies get the real stdout; everything vLLM prints goes to stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(args, reply_fd)


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
