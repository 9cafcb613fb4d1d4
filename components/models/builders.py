"""Name -> constructor for every VolumeVLM part, so one YAML line swaps an encoder, perceiver, fusion or LLM
(the LLM's own loading lives in :mod:`components.models.llm`).

    cfg = components.config.load(VLMConfig, "components/models/presets/tiny.yaml")
    model = build_vlm(cfg)
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from components.config import ConfigError, from_dict, to_dict
from components.models.config import EncoderSpec, FusionSpec, PerceiverSpec, VLMConfig
from components.models.encoders import dcformer, slice2d, vit3d
from components.models.llm import build_llm, build_llm_config, build_tokenizer, llm_hidden_size, resolve_path
from components.models.perceivers import (AvgPoolPerceiver, Conv3dPerceiver, DualStreamMixerPerceiver,
                                          DualStreamMLPPerceiver, GlobalQFormerPerceiver, LinearPerceiver, LocalQFormerPerceiver,
                                          MaxPoolPerceiver, MLP2xPerceiver, MLPMixerPerceiver, Perceiver,
                                          SpatialPoolMLPPerceiver, TGISFusion)

__all__ = ["ENCODERS", "PERCEIVERS", "register_encoder", "register_perceiver", "build_encoder", "encoder_stages",
           "encoder_volume_size", "build_perceiver", "build_fusion", "build_llm", "build_llm_config",
           "build_tokenizer", "build_vlm", "resolve_path", "encoder_weights_file", "load_weights"]

Grid = tuple[int, int, int]


# --------------------------------------------------------------------------- encoders
@dataclasses.dataclass
class EncoderFamily:
    config_cls: type | None
    presets: dict[str, Any]
    build: Callable[[Any], nn.Module]


ENCODERS: dict[str, EncoderFamily] = {
    "vit3d": EncoderFamily(vit3d.ViT3DConfig, vit3d.PRESETS, vit3d.build_vit3d),
    "dcformer": EncoderFamily(dcformer.DCFormerConfig, dcformer.PRESETS, dcformer.build_dcformer),
    "slice2d": EncoderFamily(slice2d.Slice2DConfig, slice2d.PRESETS, slice2d.build_slice2d),
}


def register_encoder(name: str, build: Callable[[dict], nn.Module], config_cls: type | None = None,
                     presets: dict[str, Any] | None = None) -> None:
    """Add an encoder family. ``build`` receives a config object (``config_cls``) or, without one, the
    merged preset + overrides mapping."""
    ENCODERS[name] = EncoderFamily(config_cls, dict(presets or {}), build)


def _family_of_preset(name: str) -> str | None:
    for family, entry in ENCODERS.items():
        if name in entry.presets:
            return family
    return None


def _encoder_config(spec: EncoderSpec):
    name, preset = spec.name, spec.preset
    if name not in ENCODERS:
        family = _family_of_preset(name)
        if family is None or preset is not None:
            raise ConfigError(f"encoder name {name!r} is unknown (families: {', '.join(ENCODERS)})")
        name, preset = family, spec.name
    family = ENCODERS[name]
    if preset is not None and preset not in family.presets:
        raise ConfigError(f"encoder preset {preset!r} is not a {name} preset (known: {', '.join(family.presets)})")
    base = family.presets[preset] if preset is not None else None
    data = to_dict(base) if dataclasses.is_dataclass(base) else dict(base or {})
    data.update(spec.overrides)
    return family, (from_dict(family.config_cls, data) if family.config_cls is not None else data)


def build_encoder(spec: EncoderSpec | str | dict, load_checkpoint: bool = True,
                  storage: dict | None = None) -> nn.Module:
    """An encoder from a spec, a family/preset name (``"e3d_vit"``) or a mapping of EncoderSpec fields;
    ``storage`` reaches a checkpoint in object storage (see :func:`load_weights`)."""
    if isinstance(spec, str):
        spec = EncoderSpec(name=spec)
    elif isinstance(spec, dict):
        spec = from_dict(EncoderSpec, spec)
    family, cfg = _encoder_config(spec)
    encoder = family.build(cfg)
    if spec.checkpoint and load_checkpoint:
        load_weights(encoder, spec.checkpoint, storage)
    return encoder


def encoder_volume_size(encoder: nn.Module) -> tuple[int, int, int] | None:
    """The (D, H, W) input the encoder was built for, when it records one."""
    size = getattr(encoder, "volume_size", None) or getattr(getattr(encoder, "config", None), "volume_size", None)
    return tuple(size) if size is not None else None


def encoder_stages(encoder: nn.Module) -> list[tuple[int, Grid]]:
    """(width, grid) of each stage the encoder reports, coarsest last."""
    dims = list(getattr(encoder, "stage_dims", None) or [encoder.out_dim])
    grids = list(getattr(encoder, "stage_grids", None) or [encoder.grid])
    if len(dims) != len(grids):
        raise ValueError(f"encoder reports {len(dims)} stage widths but {len(grids)} stage grids")
    return [(int(d), tuple(g)) for d, g in zip(dims, grids)]


def _strip_common_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    if set(state) == wanted:
        return state
    for key in state:  # find a prefix such as "encoder." that, removed, gives the module's keys
        for i in range(len(key)):
            if key[i] != "." or key[i + 1:] not in wanted:
                continue
            prefix = key[:i + 1]
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if set(stripped) == wanted:
                return stripped
    return state


ENCODER_EXPORT = "encoder.safetensors"
"""What MAE and contrastive pretraining write beside their whole model in a checkpoint's ``model/``."""


def encoder_weights_file(path: str, storage: dict | None = None):
    """``(filesystem, file)`` of the weights an encoder ``checkpoint`` names: a ``.safetensors`` file, a folder
    holding exactly one (or an ``encoder.safetensors`` among several), a checkpoint folder or a pretraining
    run folder (its newest ``checkpoint_*``), local or any fsspec URL."""
    from components.data.storage import open_fs
    from components.training.loop import find_checkpoint

    fs, root = open_fs(path, storage)
    if fs.isfile(root):
        return fs, root
    if root.endswith(".safetensors"):
        raise FileNotFoundError(f"encoder checkpoint: no file {path}")
    files = sorted(fs.glob(f"{root.rstrip('/')}/*.safetensors")) if fs.isdir(root) else []
    if len(files) == 1:
        return fs, files[0]
    exported = [f for f in files if f.rsplit("/", 1)[-1] == ENCODER_EXPORT]
    if exported:  # a checkpoint's model/ folder: the whole pretraining model plus the encoder export
        return fs, exported[0]
    if files:
        raise FileNotFoundError(f"encoder checkpoint {path}: {len(files)} .safetensors files and no {ENCODER_EXPORT}")
    fs, ckpt = find_checkpoint(path, storage, field="encoder checkpoint")
    export = f"{ckpt}/model/{ENCODER_EXPORT}"
    if not fs.isfile(export):
        raise FileNotFoundError(f"encoder checkpoint {path}: {ckpt} has no model/{ENCODER_EXPORT} "
                                "(not an MAE or contrastive pretraining run?)")
    return fs, export


def load_weights(module: nn.Module, path: str | os.PathLike, storage: dict | None = None) -> None:
    """Load encoder weights (any ``checkpoint`` that :func:`encoder_weights_file` accepts) into ``module``,
    strictly. ``storage`` (endpoint, keys) reaches object storage; without it the environment's credentials do."""
    from safetensors.torch import load_file

    from components.data.storage import is_local_fs

    fs, file = encoder_weights_file(resolve_path(str(path)), storage)
    if is_local_fs(fs):
        state = load_file(file)
    else:
        with tempfile.TemporaryDirectory(prefix="radray-weights-") as tmp:
            local = os.path.join(tmp, ENCODER_EXPORT)
            fs.get(file, local)
            state = load_file(local)
    wanted = set(module.state_dict())
    module.load_state_dict(_strip_common_prefix(state, wanted), strict=True)


# --------------------------------------------------------------------------- perceivers
def _p_conv3d(s, i, o, g, st):
    return Conv3dPerceiver(i, o, g, k=s.k)


def _p_qformer_global(s, i, o, g, st):
    return GlobalQFormerPerceiver(i, o, g, num_queries=s.out_tokens, hidden=s.hidden, heads=s.heads, depth=s.depth)


def _p_qformer_local(s, i, o, g, st):
    return LocalQFormerPerceiver(i, o, g, k=s.k, queries_per_window=s.queries_per_window, hidden=s.hidden,
                                 heads=s.heads, depth=s.depth)


def _p_mlp_mixer(s, i, o, g, st):
    return MLPMixerPerceiver(i, o, g, out_tokens=s.out_tokens, depth=s.depth, mlp_depth=s.mlp_depth)


def _p_dual_stream_mixer(s, i, o, g, st):
    return DualStreamMixerPerceiver(o, st, low_tokens=s.low_tokens, high_tokens=s.high_tokens,
                                    low_stage=s.low_stage, high_stage=s.high_stage, mlp_depth=s.mlp_depth)


def _p_dual_stream_mlp(s, i, o, g, st):
    return DualStreamMLPPerceiver(o, st, low_stage=s.low_stage, high_stage=s.high_stage, mlp_depth=s.mlp_depth)


PERCEIVERS: dict[str, Callable[[PerceiverSpec, int, int, Grid, list], Perceiver]] = {
    "conv3d": _p_conv3d,
    "qformer_global": _p_qformer_global,
    "qformer_local": _p_qformer_local,
    "mlp_mixer": _p_mlp_mixer,
    "dual_stream_mixer": _p_dual_stream_mixer,
    "dual_stream_mlp": _p_dual_stream_mlp,
    "avg_pool": lambda s, i, o, g, st: AvgPoolPerceiver(i, o, g, k=s.k),
    "max_pool": lambda s, i, o, g, st: MaxPoolPerceiver(i, o, g, k=s.k),
    "spatial_pool_mlp": lambda s, i, o, g, st: SpatialPoolMLPPerceiver(i, o, g, k=s.k),
    "linear": lambda s, i, o, g, st: LinearPerceiver(i, o, g),
    "mlp2x": lambda s, i, o, g, st: MLP2xPerceiver(i, o, g),
}


def register_perceiver(name: str, build: Callable[[PerceiverSpec, int, int, Grid, list], Perceiver]) -> None:
    """Add a perceiver: ``build(spec, in_dim, out_dim, grid, stages)``."""
    PERCEIVERS[name] = build


def build_perceiver(spec: PerceiverSpec | str | dict, out_dim: int, encoder: nn.Module | None = None, *,
                    in_dim: int | None = None, grid: Grid | None = None,
                    stages: Sequence[tuple[int, Grid]] | None = None) -> Perceiver:
    """A perceiver for ``encoder`` (or an explicit ``in_dim`` / ``grid`` / ``stages``) projecting to ``out_dim``."""
    if isinstance(spec, str):
        spec = PerceiverSpec(name=spec)
    elif isinstance(spec, dict):
        spec = from_dict(PerceiverSpec, spec)
    if spec.name not in PERCEIVERS:
        raise ConfigError(f"perceiver.name: unknown perceiver {spec.name!r} (known: {', '.join(PERCEIVERS)})")
    if encoder is not None:
        in_dim = in_dim or encoder.out_dim
        grid = grid or tuple(encoder.grid)
        stages = stages or encoder_stages(encoder)
    if in_dim is None or grid is None:
        raise ValueError("build_perceiver needs an encoder or in_dim and grid")
    stages = list(stages or [(in_dim, tuple(grid))])
    try:
        return PERCEIVERS[spec.name](spec, int(in_dim), int(out_dim), tuple(grid), stages)
    except ValueError as e:
        raise ConfigError(f"perceiver: {e}") from None


# --------------------------------------------------------------------------- fusion
def build_fusion(spec: FusionSpec | str | dict, dim: int, in_dim_2d: int) -> TGISFusion | None:
    """The 2D/3D fusion module, or None for ``name: none`` (3D only)."""
    if isinstance(spec, str):
        spec = FusionSpec(name=spec)
    elif isinstance(spec, dict):
        spec = from_dict(FusionSpec, spec)
    if spec.name == "none":
        return None
    try:
        return TGISFusion(dim, in_dim_2d, aggregation=spec.aggregation, scoring_inputs=spec.scoring_inputs,
                          tau=spec.tau, output=spec.output, projector_depth=spec.projector_depth,
                          score_dropout=spec.score_dropout)
    except ValueError as e:
        raise ConfigError(f"fusion: {e}") from None


# --------------------------------------------------------------------------- the whole model
def build_vlm(cfg: VLMConfig | str | os.PathLike | dict, overrides: list[str] | None = None,
              storage: dict | None = None):
    """A VolumeVLM from a config object, a YAML path (+ ``key=value`` overrides) or a mapping;
    ``storage`` reaches encoder checkpoints in object storage."""
    from components.config import load
    from components.models.vlm import VolumeVLM

    if isinstance(cfg, (str, os.PathLike)):
        cfg = load(VLMConfig, cfg, overrides)
    elif isinstance(cfg, dict):
        cfg = load(VLMConfig, data=cfg, overrides=overrides)
    encoder_3d = build_encoder(cfg.encoder_3d, storage=storage)
    llm, tokenizer = build_llm(cfg.llm)
    dim = llm_hidden_size(llm.config)
    perceiver = build_perceiver(cfg.perceiver, dim, encoder_3d)
    encoder_2d = build_encoder(cfg.encoder_2d, storage=storage) if cfg.encoder_2d is not None else None
    fusion = build_fusion(cfg.fusion, dim, encoder_2d.out_dim) if encoder_2d is not None else None
    return VolumeVLM(cfg, encoder_3d, perceiver, llm, tokenizer, encoder_2d=encoder_2d, fusion=fusion)
