"""On-disk cache of a quantized int8 model: quantize once per machine, then load.

:func:`adaspec.quant.quantize_model_int8` reads every fp32 weight (SmoothQuant
folding, per-channel quantization), which costs seconds and leaves the whole
fp32 model resident. With the result cached, a later load replaces the fp32
model's linear layers by :class:`Int8Linear` s built straight from the stored
int8 weights and overwrites the norms and embeddings SmoothQuant changed; the
fp32 linear weights are never read (transformers memory-maps them).

File: ``<adaspec cache>/quant/int8-model-<key>.safetensors`` with, per int8
layer, ``lin/<path>/w_int8`` (int8), ``w_scale``, ``bias``, ``inv_smooth``,
every other tensor of the quantized model's state dict under ``rest/<name>``,
and a JSON ``layout`` (where each layer goes, fused groups and their bounds,
bit widths) plus the quantization ``report`` in the metadata. The key covers
the model files (config, safetensors header and a strided sample of its
bytes), the quantization code, the calibration ids and the bit widths, so
another model, calibration or code version never reuses a file; at most
:data:`MAX_FILES` files are kept (least recently used go first).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from adaspec.quant.linear import FusedInt8Group, FusedInt8Member, Int8Linear

CACHE_VERSION = "1"
MAX_FILES = 16
_SAMPLES = 256  # strided 64-byte reads of each weights file for the key


def _file_fingerprint(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:
            h.update(f.read(min(int.from_bytes(head, "little"), 1 << 24)))  # dtypes, shapes, offsets
        for i in range(_SAMPLES):
            f.seek(size * i // _SAMPLES)
            h.update(f.read(64))


def int8_cache_key(model_dir: str | Path, calibration_ids: Sequence[torch.Tensor], activation_bits: int,
                   weight_bits: int, smooth_alpha: Optional[float]) -> Optional[str]:
    """The cache key of a model folder quantized this way, or None if the folder is not one.

    Reads the config and a strided sample of each weights file (no weight is loaded).
    """
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not config.is_file() or not weights:
        return None
    h = hashlib.sha256(f"int8-model {CACHE_VERSION} a{activation_bits} w{weight_bits} s{smooth_alpha}".encode())
    here = Path(__file__).parent
    for src in ("linear.py", "convert.py", "calibration.py"):  # the code that decides the int8 values
        h.update((here / src).read_bytes())
    h.update(config.read_bytes())
    for w in weights:
        _file_fingerprint(h, w)
    for ids in calibration_ids:
        h.update(torch.as_tensor(ids, dtype=torch.long).contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


def cache_path(key: str, cache_dir: Optional[Path] = None) -> Path:
    if cache_dir is None:
        from adaspec.models import cache_root

        cache_dir = cache_root() / "quant"
    return Path(cache_dir) / f"int8-model-{key}.safetensors"


def _layout(model: nn.Module) -> tuple[list[dict], set[str]]:
    """Each int8 layer of a quantized model, and the module paths of the Int8Linears."""
    entries, linear_paths = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, FusedInt8Group):
            continue
        members: dict[int, list] = {}
        for attr, child in mod.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, FusedInt8Member):
                group = child.group if "group" in child._modules else child._group_ref[0]
                members.setdefault(id(group), [group, {}])[1][child.index] = attr
            elif isinstance(child, Int8Linear):
                entries.append({"kind": "linear", "key": full, "parent": name, "attrs": [attr],
                                "activation_bits": child.activation_bits, "weight_bits": child.weight_bits})
                linear_paths.add(full)
        for group, by_index in members.values():
            attrs = [by_index[i] for i in sorted(by_index)]
            key = f"{name}.{attrs[0]}.group.linear" if name else f"{attrs[0]}.group.linear"
            entries.append({"kind": "fused", "key": key, "parent": name, "attrs": attrs, "bounds": group.bounds,
                            "activation_bits": group.linear.activation_bits,
                            "weight_bits": group.linear.weight_bits, "_linear": group.linear})
            linear_paths.add(key)
    return entries, linear_paths


def save_int8_model(model: nn.Module, report: dict, path: Path) -> None:
    """Write a quantized model (see the module docstring); atomic (write, fsync, rename)."""
    from safetensors.torch import save_file

    entries, linear_paths = _layout(model)
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        lin = e.pop("_linear", None) or model.get_submodule(e["key"])
        k = f"lin/{e['key']}"
        tensors[f"{k}/w_int8"] = lin._w_int8.contiguous()
        tensors[f"{k}/w_scale"] = lin.w_scale.contiguous()
        if lin.bias is not None:
            tensors[f"{k}/bias"] = lin.bias.detach().contiguous()
        if lin.inv_smooth is not None:
            tensors[f"{k}/inv_smooth"] = lin.inv_smooth.detach().contiguous()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in linear_paths or any(owner.startswith(p + ".") for p in linear_paths):
            continue
        tensors[f"rest/{name}"] = t.detach().contiguous()
    seen: dict[int, str] = {}  # tied tensors (one storage, two names): store one, point the other at it
    aliases = {}
    for k in list(tensors):
        ptr = tensors[k].data_ptr()
        if ptr in seen and tensors[k].shape == tensors[seen[ptr]].shape:
            aliases[k] = seen[ptr]
            del tensors[k]
        else:
            seen[ptr] = k
    meta = {"layout": json.dumps(entries), "report": json.dumps(report, default=str), "aliases": json.dumps(aliases)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    _evict(path.parent)


def _evict(folder: Path) -> None:
    files = sorted(folder.glob("int8-model-*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[MAX_FILES:]:
        try:
            old.unlink()
        except OSError:
            pass


_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def read_header(path: str | Path) -> dict:
    """A safetensors file's parsed header, with ``"__base__"``: the byte offset its tensor data starts at
    (pass it to :func:`read_tensors` to read several tensors without parsing it again)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header["__base__"] = 8 + n
    return header


def read_tensors(path: str | Path, names: Sequence[str], header: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """``names`` of a safetensors file read into ordinary (anonymous) memory, not memory-mapped.

    A memory-mapped tensor's touched pages stay resident while any tensor of the
    file is alive; these are freed when the tensor is, so an int8 weight the lean
    core has copied really leaves memory (:meth:`Int8Linear.release_int8`).

    Raises:
        KeyError: a name not in the file; ValueError: a dtype this reader does not know.
    """
    out = {}
    if header is None:
        header = read_header(path)
    base = header["__base__"]
    with open(path, "rb") as f:
        for name in names:
            info = header[name]
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{name}: dtype {info['dtype']} not supported")
            a, b = info["data_offsets"]
            raw = torch.empty(b - a, dtype=torch.uint8)
            f.seek(base + a)
            if f.readinto(raw.numpy()) != b - a:
                raise ValueError(f"{path}: truncated at {name}")
            out[name] = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def load_int8_model(model: nn.Module, path: Path) -> dict:
    """Make the fp32 ``model`` the cached int8 model, in place; returns the quantization report.

    Everything is read and checked before the model is touched, so a file that
    does not fit leaves the model as it was.

    Raises:
        ValueError: the file does not fit this model (a layer missing or of another shape).
        OSError / safetensors errors: the file cannot be read.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # memory-mapped: pages load as they are touched
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("/w_int8")}
        weights = [k for k in f.keys() if k.endswith("/w_int8")]
    tensors.update(read_tensors(path, weights))  # the int8 weights: released once the lean core holds its copy
    entries = json.loads(meta["layout"])
    aliases = json.loads(meta.get("aliases", "{}"))
    for k, src in aliases.items():
        tensors[k] = tensors[src]
    built = []
    for e in entries:
        parent = model.get_submodule(e["parent"]) if e["parent"] else model
        olds = [getattr(parent, a, None) for a in e["attrs"]]
        if not all(isinstance(o, nn.Linear) for o in olds):
            raise ValueError(f"{e['parent']}.{e['attrs']}: not the fp32 linear layers the cache was made from")
        k = f"lin/{e['key']}"
        w = tensors[f"{k}/w_int8"]
        if w.shape != (sum(o.out_features for o in olds), olds[0].in_features):
            raise ValueError(f"{e['key']}: cached weight {tuple(w.shape)} does not fit the model")
        lin = Int8Linear.from_int8(w, tensors[f"{k}/w_scale"], tensors.get(f"{k}/bias"), tensors.get(f"{k}/inv_smooth"),
                                   e["activation_bits"], e["weight_bits"])
        lin._int8_source = (str(path), f"{k}/w_int8")  # see Int8Linear.release_int8
        built.append((e, parent, lin))
    rest = {k[len("rest/"):]: t for k, t in tensors.items() if k.startswith("rest/")}
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, t in rest.items():
        cur = params.get(name, buffers.get(name))
        if cur is None or cur.shape != t.shape:  # (the replaced layers' tensors are not under rest/)
            raise ValueError(f"{name}: cached tensor does not fit the model")
    # checked: now change the model
    for e, parent, lin in built:
        if e["kind"] == "fused":
            group = FusedInt8Group.from_linear(lin, e["bounds"])
            for i, a in enumerate(e["attrs"]):
                setattr(parent, a, FusedInt8Member(group, i, owner=i == 0))
        else:
            setattr(parent, e["attrs"][0], lin)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, t in rest.items():
            if name in params:
                params[name].data = t
            elif name in buffers:
                owner, _, attr = name.rpartition(".")
                (model.get_submodule(owner) if owner else model)._buffers[attr] = t
    report = json.loads(meta["report"])
    if str(report.get("lm_head", "")).startswith("int8") and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    if report.get("attention"):
        from adaspec.quant.attention import use_invariant_attention

        report["attention_kernel"] = use_invariant_attention(model)
    report["cache"] = str(path)
    os.utime(path)  # least recently used goes first
    return report


def note(msg: str) -> None:
    print(f"adaspec: {msg}", file=sys.stderr, flush=True)
