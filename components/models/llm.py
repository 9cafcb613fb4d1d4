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


def _dequantised_gguf(spec: LLMSpec) -> Path:
    """Dequantise ``path/gguf_file`` once into a safetensors model + tokenizer directory and reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(resolve_path(spec.path)) / spec.gguf_file
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = _cache_root(spec) / "gguf" / f"{src.stem}-{key}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # The weights are plain floats now; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


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
    return AutoTokenizer.from_pretrained(_model_dir(spec), local_files_only=True)


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
