"""What each training stage builds, feeds and saves: MAE, contrastive, and VLM align/finetune.

A stage owns: the model and which parameters train (its tune policy), turning a batch of rows
into tensors, the loss, and the model part of a checkpoint (safetensors; no pickles).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from components.config import dump, to_dict
from components.data.prompts import format_sample
from components.training.augment import augment_batch


def _volumes(rows: dict, aug, device) -> torch.Tensor:
    vols = np.asarray(rows["volume"], dtype=np.float32)
    return torch.as_tensor(augment_batch(aug, vols)).to(device)


def blind(volumes: torch.Tensor, images: str) -> torch.Tensor:
    """``real`` volumes as they are; ``zeros``; or ``shuffled``: each sample gets the next one's volume."""
    if images == "zeros":
        return torch.zeros_like(volumes)
    if images == "shuffled":
        return volumes.roll(1, dims=0)
    if images != "real":
        raise ValueError(f"images must be real, zeros or shuffled, got {images!r}")
    return volumes


def _counts(model: torch.nn.Module) -> dict[str, int]:
    # a ZeRO-3 partitioned parameter holds an empty tensor; ds_numel is its full size
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return {"total": sum(n for n, _ in sizes), "trainable": sum(n for n, grad in sizes if grad)}


def _save_state(state: dict, path: str) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path)


def _save_with_encoder(full_state: dict, directory: str, filename: str, encoder_prefix: str) -> None:
    """The whole pretraining model (for resuming) plus its encoder alone (for a VLM's encoder_3d.checkpoint)."""
    from components.models.builders import ENCODER_EXPORT

    os.makedirs(directory, exist_ok=True)
    _save_state(full_state, os.path.join(directory, filename))
    enc = {k.removeprefix(encoder_prefix): v for k, v in full_state.items() if k.startswith(encoder_prefix)}
    _save_state(enc, os.path.join(directory, ENCODER_EXPORT))


class MAEStage:
    """E3D-GPT's 3D MAE pretraining of the ViT; exports the encoder as the VLM's foundation."""

    name = "mae"
    needs_samples = False

    def __init__(self, mae_cfg):
        self.cfg = mae_cfg

    def build_model(self, init_from: str | None):
        from components.models.pretraining.mae import build_mae

        model = build_mae(self.cfg)
        if init_from:
            model.load_state_dict(load_file(os.path.join(init_from, "model", "mae.safetensors")))
        return model

    def parameter_counts(self, model):
        return _counts(model)

    def collate(self, rows: dict, aug, rng: random.Random, device) -> dict:
        return {"volume": _volumes(rows, aug, device)}

    def forward(self, model, inputs: dict):
        out = model(inputs["volume"])
        return out["loss"], 0

    def save_model(self, module, full_state: dict, directory: str) -> None:
        _save_with_encoder(full_state, directory, "mae.safetensors", "encoder.")

    def load_model(self, module, directory: str) -> None:
        module.load_state_dict(load_file(os.path.join(directory, "mae.safetensors")))


CONTRASTIVE_SETTINGS = "contrastive.yaml"
"""Beside ``contrastive.safetensors``: the encoder spec, contrastive config and text length it was trained with."""


class ContrastiveStage:
    """Med3DVLM's SigLIP (or CLIP) pretraining of the image encoder against a text encoder."""

    name = "contrastive"
    needs_samples = True
    tasks = ("caption",)

    def __init__(self, contrastive_cfg, encoder_spec, max_text_tokens: int = 128, storage: dict | None = None):
        self.cfg, self.encoder_spec, self.max_len = contrastive_cfg, encoder_spec, max_text_tokens
        self.storage = storage
        """The job's object-storage settings, for an encoder ``checkpoint`` in a bucket."""
        self.tokenizer = None

    def build_model(self, init_from: str | None):
        from transformers import AutoTokenizer

        from components.models.builders import build_encoder
        from components.models.pretraining.contrastive import build_contrastive, default_text_encoder_path

        model = build_contrastive(self.cfg, build_encoder(self.encoder_spec, storage=self.storage))
        text_path = getattr(self.cfg, "text_encoder", None) or default_text_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(text_path, local_files_only=True)
        if init_from:
            model.load_state_dict(load_file(os.path.join(init_from, "model", "contrastive.safetensors")))
        return model

    def parameter_counts(self, model):
        return _counts(model)

    def collate(self, rows: dict, aug, rng: random.Random, device) -> dict:
        tok = self.tokenizer([str(a) for a in rows["answer"]], padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        return {"volume": _volumes(rows, aug, device), "input_ids": tok["input_ids"].to(device),
                "attention_mask": tok["attention_mask"].to(device)}

    def forward(self, model, inputs: dict):
        out = model(inputs["volume"], inputs["input_ids"], inputs["attention_mask"])
        return out["loss"], int(inputs["attention_mask"].sum())

    def save_model(self, module, full_state: dict, directory: str) -> None:
        _save_with_encoder(full_state, directory, "contrastive.safetensors", "image_encoder.")
        # the structure the weights belong to, so retrieval evaluation can rebuild the model without the recipe
        dump({"encoder": {**to_dict(self.encoder_spec), "checkpoint": None}, "model": to_dict(self.cfg),
              "max_text_tokens": self.max_len}, os.path.join(directory, CONTRASTIVE_SETTINGS))

    def load_model(self, module, directory: str) -> None:
        module.load_state_dict(load_file(os.path.join(directory, "contrastive.safetensors")))

    @classmethod
    def from_export(cls, directory: str):
        """``(stage, model)`` rebuilt from a checkpoint's ``model/`` folder that :meth:`save_model` wrote,
        without the recipe (what retrieval evaluation loads)."""
        import yaml

        from components.config import from_dict
        from components.models.config import EncoderSpec
        from components.models.pretraining.contrastive import ContrastiveConfig

        settings = os.path.join(directory, CONTRASTIVE_SETTINGS)
        if not os.path.exists(settings):
            raise FileNotFoundError(f"{directory}: not a contrastive checkpoint (no {CONTRASTIVE_SETTINGS}); "
                                    "ray_jobs.pretrain_contrastive writes one")
        with open(settings, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
        stage = cls(from_dict(ContrastiveConfig, saved["model"]), from_dict(EncoderSpec, saved["encoder"]),
                    int(saved["max_text_tokens"]))
        model = stage.build_model(None)
        stage.load_model(model, directory)
        return stage, model


class VLMStage:
    """VolumeVLM tuning: ``align`` (perceiver only) or ``finetune`` (perceiver + LoRA), as the recipe's tune modes say."""

    needs_samples = True

    def __init__(self, vlm_cfg, stage: str, tasks, images: str = "real", storage: dict | None = None):
        self.cfg, self.name, self.tasks, self.images = vlm_cfg, stage, tuple(tasks), images
        self.storage = storage
        """The job's object-storage settings, for encoder checkpoints in a bucket (a pretraining run)."""

    def build_model(self, init_from: str | None):
        from components.models.builders import build_vlm
        from components.models.vlm import VolumeVLM

        if init_from:
            # the previous stage's weights, with this recipe's tune modes (e.g. LoRA switched on)
            model = VolumeVLM.from_pretrained(os.path.join(init_from, "model"), overrides=None)
            model.config.tune = self.cfg.tune
            model.apply_tune_modes()
        else:
            model = build_vlm(self.cfg, storage=self.storage)
        self.model_ref = model
        return model

    def parameter_counts(self, model):
        return {**_counts(model), **{f"trainable_{k}": v for k, v in model.trainable_parameters().items()}}

    def collate(self, rows: dict, aug, rng: random.Random, device) -> dict:
        model = self.model_ref
        n = len(rows["answer"])
        examples = []
        for i in range(n):
            sample = {k: (rows[k][i] if k != "choices" else list(rows[k][i])) for k in
                      ("task", "question", "answer", "answer_choice", "choices")}
            question, answer = format_sample(sample, rng)
            examples.append(model.build_example(question, answer))
        batch = model.collate(examples)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["volume"] = blind(_volumes(rows, aug, device), self.images)
        return batch

    def forward(self, model, inputs: dict):
        keys = ("volume", "input_ids", "attention_mask", "labels", "question_ids", "question_attention_mask")
        out = model(**{k: inputs[k] for k in keys if k in inputs})
        return out.loss, int((inputs["labels"] != -100).sum())

    def save_model(self, module, full_state: dict, directory: str) -> None:
        # full_state, not the module's own weights: under ZeRO-3 those are this rank's partitions only
        module.save_pretrained(directory, state_dict=full_state)

    def load_model(self, module, directory: str) -> None:
        from components.models.vlm import VolumeVLM

        loaded = VolumeVLM.from_pretrained(directory)
        loaded.config.tune = self.cfg.tune
        loaded.apply_tune_modes()
        missing = module.load_state_dict(loaded.state_dict(), strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has weights this model lacks: {missing.unexpected_keys[:5]}")
