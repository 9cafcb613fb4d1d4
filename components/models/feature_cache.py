"""Reuse a frozen encoder's outputs for inputs it has already seen.

A frozen encoder maps the same volume to the same features every time, and a tuning run shows each
volume many times (once per question and per epoch). Entries are keyed by a digest of each sample's
bytes, so any change to the input (augmentation, another preprocessing) is simply a miss: the cache
can never return features of a different input. Least recently used entries go first once the
memory budget is spent.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from typing import Any, Callable

import torch

__all__ = ["FrozenFeatureCache", "sample_digest"]


def sample_digest(x: torch.Tensor) -> bytes:
    """A digest of one sample's shape, dtype and bytes."""
    data = x.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(data.shape)}{data.dtype}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy of it
    return h.digest()


def _take(out: Any, i: int) -> Any:
    """Sample ``i`` of a batched output (tensors, dataclasses, lists/tuples of them; other values kept)."""
    if isinstance(out, torch.Tensor):
        return out[i:i + 1].detach().clone()  # its own storage, not a view of the batch
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **{f.name: _take(getattr(out, f.name), i) for f in dataclasses.fields(out)})
    if isinstance(out, (list, tuple)):
        return type(out)(_take(v, i) for v in out)
    return out


def _stack(parts: list[Any]) -> Any:
    """Inverse of ``_take``: one batched output from per-sample outputs."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{f.name: _stack([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first)})
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([p[k] for p in parts]) for k in range(len(first)))
    return first


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if dataclasses.is_dataclass(out):
        return sum(_nbytes(getattr(out, f.name)) for f in dataclasses.fields(out))
    if isinstance(out, (list, tuple)):
        return sum(_nbytes(v) for v in out)
    return 0


class FrozenFeatureCache:
    """Per-sample outputs of one frozen encoder, at most ``max_mb`` MiB of them."""

    def __init__(self, max_mb: float):
        if max_mb <= 0:
            raise ValueError(f"a feature cache needs a positive budget, got {max_mb} MiB")
        self.max_bytes = int(max_mb * 1024**2)
        self.entries: OrderedDict[bytes, Any] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __call__(self, encode: Callable[[torch.Tensor], Any], x: torch.Tensor, keys: list[bytes] | None = None) -> Any:
        """``encode(x)``, running the encoder only on the samples of ``x`` not seen before. ``keys``:
        the samples' digests when the caller already has them (several encoders read one volume)."""
        keys = [sample_digest(s) for s in x] if keys is None else keys
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                out = encode(x[missing])
            fresh = {keys[i]: _take(out, j) for j, i in enumerate(missing)}
        parts = []
        for k in keys:
            if k in fresh:
                parts.append(fresh[k])
            else:
                parts.append(self.entries[k])
                self.entries.move_to_end(k)
        for k, v in fresh.items():
            self._put(k, v)
        return _stack(parts)

    def _put(self, key: bytes, value: Any) -> None:
        size = _nbytes(value)
        if key in self.entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= _nbytes(old)
        self.entries[key] = value
        self.bytes += size
