"""Load the int8 lean target straight from the int8 model cache, without transformers.

The first int8 load of a model quantizes it and writes the int8 model cache
(:mod:`adaspec.quant.cache`). From then on this module builds the same
:class:`~adaspec.model.target.LeanTarget` from that file alone: ``config.json``
read as JSON, the kernel's linears made from the cached int8 weights, scales,
biases and smoothing factors (stacked exactly as
:meth:`~adaspec.model.decoder.LeanDecoder.from_hf` stacks them), the (smoothed)
norms and the embedding from the cache, the rotary table computed as
transformers' default RoPE computes it, and the tokenizer from
``tokenizer.json`` (:class:`~adaspec.model.tokenizer.FastTokenizer`). Neither
transformers nor the fp32 weights are read, which is most of a start-up.

The transformers module is still there for the code that runs the model whole
(perplexity, weight updates, training): ``target.model`` is a
:class:`LazyModule` that loads it, with the same cached int8 layers, the first
time anything reads it. Where the fast path does not apply (float32, another
RoPE type or architecture, no cache file yet, ``$ADASPEC_FAST_LOAD=0``)
:func:`load_fast` returns None and :func:`adaspec.target.load_target` loads the
usual way. ``tests/test_fast_load.py`` checks the result bitwise against that way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

#: ``architectures`` entries the fast path builds (the lean decoder's families)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class LazyModule:
    """Stands in for a module until something reads it; then loads it once and forwards to it.

    Args:
        load: returns the module (called at most once, on first attribute access or call).
    """

    def __init__(self, load: Callable[[], Any]) -> None:
        object.__setattr__(self, "_load", load)
        object.__setattr__(self, "_module", None)

    @property
    def loaded(self) -> bool:
        """Whether the module has been loaded."""
        return object.__getattribute__(self, "_module") is not None

    def get(self) -> Any:
        """The module (loading it now if needed)."""
        module = object.__getattribute__(self, "_module")
        if module is None:
            module = object.__getattribute__(self, "_load")()
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.get(), name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.get()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyModule(loaded={self.loaded})"


def enabled() -> bool:
    """False when ``$ADASPEC_FAST_LOAD`` is ``0`` (always load through transformers)."""
    return os.environ.get("ADASPEC_FAST_LOAD", "1").strip().lower() not in ("0", "false", "no", "off")


def unsupported_reason(config: dict) -> Optional[str]:
    """Why the fast path does not build the model ``config`` (a parsed ``config.json``) describes."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        return f"architectures {archs} is not one of {sorted(ARCHITECTURES)}"
    if config.get("model_type") != ARCHITECTURES[archs[0]]:
        return f"model_type {config.get('model_type')!r} does not match {archs[0]}"
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {config.get('hidden_act')!r}"
    if config.get("use_sliding_window"):
        return "sliding-window attention"
    if _rope_theta(config) is None:
        return "RoPE other than the default type"
    if config.get("quantization_config"):
        return "a quantized checkpoint"
    return None


def _rope_theta(config: dict) -> Optional[float]:
    """The default RoPE's base, or None for any other RoPE type."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if params.get("rope_type", params.get("type", "default")) != "default" or "rope_theta" not in params:
            return None
        return float(params["rope_theta"])
    if config.get("rope_scaling"):
        return None
    return float(config.get("rope_theta", 10000.0))


def rotary_tables(config: dict, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin``: ``[max_positions, head_dim]`` float32, as transformers' default RoPE computes them
    (``inv_freq = 1 / base ** (arange(0, D, 2) / D)``, angles duplicated over both halves)."""
    H, Hq = int(config["hidden_size"]), int(config["num_attention_heads"])
    D = int(config.get("head_dim") or H // Hq)
    base = _rope_theta(config)
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    pos = torch.arange(max_positions, dtype=torch.int64)
    freqs = pos[:, None].float() * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()


def _eos_ids(folder: Path, config: dict, tokenizer: Any) -> set[int]:
    """As :attr:`adaspec.target.TargetModel.eos_token_ids`: the config's, the generation config's, the tokenizer's."""
    sources = [config.get("eos_token_id")]
    try:
        sources.append(json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id"))
    except (OSError, ValueError):
        pass
    sources.append(tokenizer.eos_token_id)
    ids: set[int] = set()
    for src in sources:
        if src is not None:
            ids.update([int(src)] if isinstance(src, int) else [int(i) for i in src])
    return ids


class _CachedInt8:
    """The int8 model cache file's tensors and layout, indexed by module path."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            self.tensors = {k: f.get_tensor(k) for k in keys if not k.endswith("/w_int8")}
        self.path = path
        from adaspec.quant.cache import read_header

        self.header = read_header(path)  # parsed once for every int8 weight read
        for k, src in json.loads(meta.get("aliases", "{}")).items():
            self.tensors[k] = self.tensors[src]
        self.report = json.loads(meta["report"])
        self.members: dict[str, tuple[dict, slice]] = {}  # module path -> (layout entry, its rows)
        for e in json.loads(meta["layout"]):
            for i, attr in enumerate(e["attrs"]):
                path_ = f"{e['parent']}.{attr}" if e["parent"] else attr
                rows = slice(e["bounds"][i], e["bounds"][i + 1]) if e["kind"] == "fused" else None
                self.members[path_] = (e, rows)

    def rest(self, name: str) -> torch.Tensor:
        """A non-linear tensor of the quantized model's state dict (``KeyError`` if absent)."""
        return self.tensors[f"rest/{name}"]

    def linear(self, ext, paths: list[str]):
        """One kernel Linear for the modules ``paths`` stacked along the output dimension,
        with :func:`adaspec.model.decoder.stack_int8_linear`, as ``_linear`` stacks their Int8Linears.

        Raises:
            ValueError: a path that is not a cached int8 layer, or layers that cannot be stacked.
        """
        from adaspec.model.decoder import stack_int8_linear
        from adaspec.quant.cache import read_tensors

        blocks, weights = [], {}
        for p in paths:
            if p not in self.members:
                raise ValueError(f"{p}: not an int8 layer of the cached model")
            e, rows = self.members[p]
            k = f"lin/{e['key']}"
            if e["key"] not in weights:  # a fused group's rows share one read
                weights[e["key"]] = read_tensors(self.path, [f"{k}/w_int8"], self.header)[f"{k}/w_int8"]
            w = weights[e["key"]]
            sl = rows if rows is not None else slice(0, w.shape[0])
            bias = self.tensors.get(f"{k}/bias")
            blocks.append((w[sl], self.tensors[f"{k}/w_scale"][sl], None if bias is None else bias[sl],
                           self.tensors.get(f"{k}/inv_smooth"), e["activation_bits"]))
        return stack_int8_linear(ext, blocks)


#: the tokenizer files whose bytes decide the calibration ids (with the calibration texts and code)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _calibration_ids(folder: Path, tokenizer: Any, compute: Any) -> list[torch.Tensor]:
    """``compute(tokenizer)`` (the int8 cache key's calibration ids), memoized on disk.

    Rendering the chat texts through the template imports jinja2 (~0.15 s of start-up), so the
    ids are kept in ``<adaspec cache>/quant/calibration-ids-<digest>.json``, where the digest
    covers the calibration texts, the code that tokenizes them and the model folder's tokenizer
    files; anything unreadable is computed again.
    """
    from adaspec.models import cache_root
    from adaspec.quant import calibration

    h = hashlib.sha256(b"calibration-ids 1")
    h.update(Path(calibration.__file__).read_bytes())
    h.update(json.dumps(calibration.calibration_texts()).encode())
    for name in _TOKENIZER_FILES:
        f = folder / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"-"))
    memo = cache_root() / "quant" / f"calibration-ids-{h.hexdigest()[:24]}.json"
    try:
        rows = json.loads(memo.read_text())
        return [torch.tensor(r, dtype=torch.long) for r in rows]
    except (OSError, ValueError, TypeError):
        pass
    ids = compute(tokenizer)
    try:
        from adaspec.store import write_atomic

        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps([t.tolist() for t in ids]).encode(), mode=0o644)
    except OSError:  # a read-only cache: computed at every start
        pass
    return ids


def load_fast(name: str, folder: Path, max_model_len: Optional[int] = None,
              pool_tokens: Optional[int] = None) -> Optional[Any]:
    """The int8 :class:`~adaspec.model.target.LeanTarget` of model folder ``folder`` from its int8 cache,
    or None where the fast path does not apply (the caller then loads through transformers).

    Args:
        name: the model id (registry name or path) the target is known by.
        folder: the resolved model folder (:func:`adaspec.models.resolve_model`).
        max_model_len: context window (default: ``max_position_embeddings`` capped at 8192).
        pool_tokens: KV pool capacity (see :meth:`LeanDecoder.from_hf`).

    Raises:
        RuntimeError: the lean kernel does not build.
    """
    if not enabled():
        return None
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if unsupported_reason(config):
        return None
    from adaspec.model import tokenizer as fast_tokenizer

    if fast_tokenizer.unsupported_reason(folder) is None:
        tokenizer = fast_tokenizer.FastTokenizer(folder)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    from adaspec.quant import cache
    from adaspec.quant.calibration import default_calibration_ids
    from adaspec.quant.convert import DEFAULT_SMOOTH_ALPHA
    from adaspec.quant.linear import default_bits

    calibration_ids = _calibration_ids(folder, tokenizer, default_calibration_ids)
    a_bits, w_bits = default_bits()
    key = cache.int8_cache_key(folder, calibration_ids, a_bits, w_bits, DEFAULT_SMOOTH_ALPHA) if calibration_ids else None
    path = cache.cache_path(key) if key else None
    if path is None or not path.exists():
        return None
    try:
        return _build(name, folder, config, tokenizer, path, max_model_len, pool_tokens)
    except (KeyError, ValueError, OSError) as exc:  # a damaged or foreign file: the usual load rewrites it
        cache.note(f"int8 cache {path.name} not loadable directly ({type(exc).__name__}: {exc}); loading through "
                   "transformers")
        return None


@torch.no_grad()
def _build(name: str, folder: Path, config: dict, tokenizer: Any, path: Path, max_model_len: Optional[int],
           pool_tokens: Optional[int]) -> Any:
    from adaspec.model.build import lean_kernel
    from adaspec.model.decoder import LeanDecoder, _trim_heap
    from adaspec.model.kv import BlockPool, kv_dtype_for
    from adaspec.model.target import LeanTarget

    cached = _CachedInt8(path)
    window = int(config.get("max_position_embeddings", 2048) or 2048)
    window = min(window, 8192) if max_model_len is None else int(max_model_len)
    H, Hq = int(config["hidden_size"]), int(config["num_attention_heads"])
    Hkv = int(config.get("num_key_value_heads") or Hq)
    D = int(config.get("head_dim") or H // Hq)
    I = int(config["intermediate_size"])
    L = int(config["num_hidden_layers"])
    if D % 8 or H % 8 or I % 8:
        raise ValueError("hidden, intermediate and head sizes must be multiples of 8")
    eps = float(config.get("rms_norm_eps", 1e-6))
    ext = lean_kernel()
    cos, sin = rotary_tables(config, window)
    embed = cached.rest("model.embed_tokens.weight").float().contiguous()
    km = ext.LeanModel(H, Hq, Hkv, D, I, eps, 64, cos, sin, embed)
    for i in range(L):
        p = f"model.layers.{i}"
        qkv = cached.linear(ext, [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"])
        o = cached.linear(ext, [f"{p}.self_attn.o_proj"])
        gate_up = cached.linear(ext, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        down = cached.linear(ext, [f"{p}.mlp.down_proj"])
        km.add_layer(cached.rest(f"{p}.input_layernorm.weight").float(), qkv, o,
                     cached.rest(f"{p}.post_attention_layernorm.weight").float(), gate_up, down)
    head = cached.linear(ext, ["lm_head"])
    km.set_head(cached.rest("model.norm.weight").float(), head)
    _trim_heap()
    head_entry, head_rows = cached.members["lm_head"]
    vocab = int(cached.tensors[f"lin/{head_entry['key']}/w_scale"].shape[0])
    pool_tokens = pool_tokens or 8 * window
    pool = BlockPool(L, Hkv, D, -(-pool_tokens // 64), 64, kv_dtype_for("int8"))
    decoder = LeanDecoder(km, num_layers=L, hidden_size=H, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                          vocab_size=vocab, max_positions=window, dtype="int8", pool=pool)
    report = dict(cached.report)
    report["cache"] = str(path)
    os.utime(path)  # least recently used goes first

    def load_module():
        from transformers import AutoModelForCausalLM

        from adaspec.quant import Int8Linear
        from adaspec.quant import cache as int8_cache

        module = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        module.eval()
        int8_cache.load_int8_model(module, path)
        for mod in module.modules():  # as LeanDecoder.from_hf: the kernel holds the int8 weights
            if isinstance(mod, Int8Linear):
                mod.release_int8()
        return module

    target = LeanTarget(model=LazyModule(load_module), tokenizer=tokenizer, name=name, dtype="int8",
                        max_model_len=window, quant_report=report, decoder=decoder)
    target.fast_tensors = FastTensors(cached, head_entry, head_rows, vocab, _eos_ids(folder, config, tokenizer))
    return target


class FastTensors:
    """What a fast-loaded target answers without its transformers module: vocabulary size,
    EOS ids, the embedding, the LM head's rows (dequantized as ``Int8Linear.dequantized_weight``)
    and the final norm."""

    def __init__(self, cached: _CachedInt8, head_entry: dict, head_rows: Optional[slice], vocab_size: int,
                 eos_ids: set[int]) -> None:
        self._cached = cached
        self._head_key = f"lin/{head_entry['key']}"
        self._head_entry = head_entry
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_ids
        if head_rows is not None and (head_rows.start != 0 or head_rows.stop != vocab_size):
            raise ValueError("a fused LM head")

    def embedding_weight(self) -> torch.Tensor:
        """``[V, H]`` float32 input embeddings."""
        return self._cached.rest("model.embed_tokens.weight")

    def final_norm_weight(self) -> torch.Tensor:
        """``[H]`` float32 final norm scale."""
        return self._cached.rest("model.norm.weight").float()

    def lm_head_weight(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[V, H]`` (or ``[len(rows), H]``) float32 dequantized LM head."""
        from safetensors import safe_open

        with safe_open(str(self._cached.path), framework="pt") as f:  # memory-mapped: only the rows read are touched
            w8 = f.get_tensor(f"{self._head_key}/w_int8")
        scale = self._cached.tensors[f"{self._head_key}/w_scale"]
        smooth = self._cached.tensors.get(f"{self._head_key}/inv_smooth")
        w = w8.float() * scale[:, None] if rows is None else w8[rows].float() * scale[rows][:, None]
        return (w if smooth is None else w * smooth[None, :]).detach().float()
