"""The language model of a VolumeVLM, offline: built from a config, loaded from a local folder or an
installed package (``pkg:<name>``), or dequantised once from a GGUF file into a reusable cache."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from components.config import ConfigError, from_dict
from components.models.config import LLMSpec

__all__ = ["build_llm", "build_llm_config", "build_tokenizer", "llm_hidden_size", "resolve_path"]


def resolve_path(path: str) -> str:
    """``pkg:<package>[/sub/path]`` -> the installed package's directory (the package is not imported)."""
    if not path.startswith("pkg:"):
        return os.path.expanduser(path)
    package, _, rest = path[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{path}: package {package!r} is not installed")
    return os.path.join(list(found.submodule_search_locations)[0], rest)


def _cache_root(spec: LLMSpec) -> Path:
    root = spec.cache_dir or os.environ.get("RADRAY_CACHE") or "~/.cache/radray"
    return Path(os.path.expanduser(root))


def _gguf_cache_dir(spec: LLMSpec) -> tuple[Path, Path]:
    """``(GGUF file, its cache folder)``; the folder's name changes when the file does."""
    src = Path(resolve_path(spec.path)) / spec.gguf_file
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return src, _cache_root(spec) / "gguf" / f"{src.stem}-{key}"


def _save_once(target: Path, *parts) -> Path:
    """Write ``parts`` (objects with ``save_pretrained``) into ``target`` unless another process got there
    first: they go to a private folder that is renamed into place."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in parts:
        part.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def _dequantised_gguf(spec: LLMSpec) -> Path:
    """Dequantise ``path/gguf_file`` once into a safetensors model + tokenizer directory and reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, target = _gguf_cache_dir(spec)
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # The weights are plain floats now; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _save_once(target, model, tokenizer)


def _gguf_tokenizer_dir(spec: LLMSpec) -> Path:
    """The GGUF's tokenizer alone, cached on first use. Dequantising every tensor of the model (about 25 s
    for SmolLM2-135M on 2 cores) is wasted when the weights come from config; the tokenizer takes 5 s."""
    from transformers import AutoTokenizer

    src, full = _gguf_cache_dir(spec)
    if (full / "tokenizer_config.json").exists():
        return full
    target = full.with_name(full.name + "-tokenizer")
    if (target / "tokenizer_config.json").exists():
        return target
    return _save_once(target, AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name))


def _model_dir(spec: LLMSpec) -> str:
    if spec.gguf_file:
        return str(_dequantised_gguf(spec))
    return resolve_path(spec.path)


def build_llm_config(spec: LLMSpec | dict):
    """The LLM's architecture config, without loading weights where the spec allows it."""
    from transformers import AutoConfig

    if isinstance(spec, dict):
        spec = from_dict(LLMSpec, spec)
    if spec.config:
        cfg = dict(spec.config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if spec.gguf_file:
        return AutoConfig.from_pretrained(resolve_path(spec.path), gguf_file=spec.gguf_file)
    return AutoConfig.from_pretrained(resolve_path(spec.path), local_files_only=True)


def build_tokenizer(spec: LLMSpec | dict):
    from transformers import AutoTokenizer

    if isinstance(spec, dict):
        spec = from_dict(LLMSpec, spec)
    if spec.tokenizer:
        return AutoTokenizer.from_pretrained(resolve_path(spec.tokenizer), local_files_only=True)
    if spec.source == "config" and not (spec.path and spec.gguf_file):
        raise ConfigError("llm.tokenizer: a model built from config needs a tokenizer directory "
                          "(or path + gguf_file to take the tokenizer of a GGUF model)")
    folder = _gguf_tokenizer_dir(spec) if spec.gguf_file else _model_dir(spec)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_llm(spec: LLMSpec | dict, with_tokenizer: bool = True):
    """``(AutoModelForCausalLM, tokenizer or None)`` from a spec; offline only."""
    from transformers import AutoModelForCausalLM

    if isinstance(spec, dict):
        spec = from_dict(LLMSpec, spec)
    dtype = getattr(torch, spec.dtype)
    kwargs = {"dtype": dtype}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.source == "config":
        model = AutoModelForCausalLM.from_config(build_llm_config(spec), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(_model_dir(spec), local_files_only=True, **kwargs)
    return model, (build_tokenizer(spec) if with_tokenizer else None)


def llm_hidden_size(llm_config) -> int:
    text = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    return int(text.hidden_size)
