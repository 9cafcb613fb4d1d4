"""Typed configuration of a VolumeVLM: which encoder, perceiver, fusion and LLM, and how each is tuned.

Load one with ``components.config.load(VLMConfig, "components/models/presets/e3d_gpt.yaml")``; every
field below is validated and a bad value names its dotted path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["TuneMode", "EncoderSpec", "PerceiverSpec", "FusionSpec", "LLMSpec", "LoraSpec", "TuneSpec", "VLMConfig"]

TuneMode = Literal["frozen", "full", "lora"]


@dataclass
class EncoderSpec:
    """An image encoder, by family name and preset."""

    name: str
    """Family: ``vit3d``, ``dcformer`` (3D), ``slice2d`` (per-slice SigLIP), any name added with
    ``builders.register_encoder``, or directly a preset name such as ``e3d_vit``."""
    preset: str | None = None
    """Preset of the family (``e3d_vit``, ``m3d_vit``, ``dcformer_small``, ``siglip_base_patch16_224``, ...);
    null = the family's default config."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields replaced on top of the preset, e.g. ``{depth: 2}`` or ``{volume_size: [32, 64, 64]}``."""
    checkpoint: str | None = None
    """Weights to load, local or in object storage (``s3://...``, any fsspec URL; a training job reaches it
    with its ``storage`` settings): a ``.safetensors`` file with the encoder's state dict; a folder holding
    exactly one; a checkpoint folder (its ``model/encoder.safetensors``, the MAE or contrastive pretraining
    export); or a pretraining run folder, ``<run.storage_path>/<run.name>`` (its newest ``checkpoint_*``)."""


@dataclass
class PerceiverSpec:
    """The perceiver / projector between the 3D encoder and the LLM. Fields a family does not use are ignored."""

    name: str = "conv3d"
    """``conv3d`` | ``qformer_global`` | ``qformer_local`` | ``mlp_mixer`` | ``dual_stream_mixer`` |
    ``dual_stream_mlp`` | ``avg_pool`` | ``max_pool`` | ``spatial_pool_mlp`` | ``linear`` | ``mlp2x``."""
    k: int = 2
    """Kernel = stride (conv3d), pooling size (avg_pool, max_pool, spatial_pool_mlp), window (qformer_local)."""
    out_tokens: int = 256
    """Number of learnable queries (qformer_global) or output tokens (mlp_mixer)."""
    depth: int = 2
    """Transformer layers (qformer_*) or mixer layers (mlp_mixer)."""
    hidden: int | None = None
    """Q-Former width; null = the encoder width."""
    heads: int = 8
    """Q-Former attention heads."""
    queries_per_window: int = 1
    """qformer_local: learnable queries per window."""
    low_tokens: list[int] = field(default_factory=lambda: [192, 128])
    """dual_stream_mixer: tokens after each mixer layer of the low (penultimate-stage) stream."""
    high_tokens: list[int] = field(default_factory=lambda: [64, 128])
    """dual_stream_mixer: tokens after each mixer layer of the high (final-stage) stream."""
    low_stage: int = -2
    """dual_stream_mixer / dual_stream_mlp: encoder stage feeding the low stream (index into EncoderOutput.stages)."""
    high_stage: int = -1
    """dual_stream_mixer / dual_stream_mlp: encoder stage feeding the high stream."""
    mlp_depth: int = 2
    """Linear layers inside each mixer MLP (and of each dual_stream_mlp stream)."""


@dataclass
class FusionSpec:
    """How per-slice 2D features join the 3D tokens (Med-2E3's TG-IS); ``none`` = 3D only."""

    name: Literal["none", "tgis"] = "none"
    """``tgis`` needs ``encoder_2d``."""
    aggregation: Literal["tgis", "avg", "max", "random"] = "tgis"
    """How the N slices' 2D features are reduced: TG-IS scores, mean, element-wise max, or random softmax weights."""
    scoring_inputs: list[Literal["text", "3d", "2d"]] = field(default_factory=lambda: ["text", "3d", "2d"])
    """What the TG-IS score sees; without ``text`` a linear layer scores each slice. Needs ``3d`` or ``2d``."""
    tau: float = 1.0
    """Softmax temperature of the slice scores (the paper's softmax has none, i.e. 1)."""
    output: Literal["3d+2d", "2d"] = "3d+2d"
    """Image tokens handed to the LLM: ``[z3D; z2D]`` (Med-2E3) or ``z2D`` alone (the 2D-only ablation)."""
    projector_depth: int = 2
    """Linear layers of the slice projector (2D encoder width -> LLM width); 2 = ``mlp2x_gelu``."""
    score_dropout: float = 0.0
    """Dropout on the slice weights during training."""


@dataclass
class LLMSpec:
    """The causal language model, any ``AutoModelForCausalLM``. Nothing is fetched from the Hub."""

    source: Literal["config", "pretrained"] = "pretrained"
    """``pretrained``: load weights from ``path``; ``config``: initialise from ``config`` (random weights)."""
    path: str | None = None
    """Local model directory (``pkg:<python package>`` = that installed package's directory)."""
    gguf_file: str | None = None
    """A GGUF file inside ``path`` to dequantise; the result is cached as safetensors under ``cache_dir``."""
    config: dict[str, Any] = field(default_factory=dict)
    """Architecture as ``AutoConfig.for_model`` fields (``model_type`` first). Builds the model when
    ``source: config``; with ``pretrained`` it lets architecture-only tools (the summary) run without weights."""
    tokenizer: str | None = None
    """Tokenizer directory; null = ``path``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the LLM."""
    attn_implementation: str | None = None
    """``sdpa`` | ``eager`` | ``flash_attention_2``; null = the transformers default."""
    cache_dir: str | None = None
    """Where dequantised GGUF models are kept; null = ``$RADRAY_CACHE`` or ``~/.cache/radray``."""

    def __post_init__(self):
        if self.source == "config" and not self.config.get("model_type"):
            raise ValueError("config: source 'config' needs config.model_type (e.g. llama, qwen2)")
        if self.source == "pretrained" and not self.path:
            raise ValueError("path: source 'pretrained' needs a local model directory")


@dataclass
class LoraSpec:
    """peft LoRA settings (E3D-GPT: r=16, alpha=32, dropout 0.1; Med3DVLM: dropout 0.05)."""

    r: int = 16
    """Rank of the update."""
    alpha: int = 32
    """Scaling numerator (update scale = alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch input."""
    target_modules: list[str] | str = "all-linear"
    """Module names (suffixes) to adapt, or ``all-linear``."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside LoRA."""


@dataclass
class TuneSpec:
    """Tune mode per part: ``frozen`` (no gradients), ``full`` or ``lora``.

    Stage 1 (alignment) = perceiver only; stage 2 = perceiver ``full`` + LLM ``lora``.
    """

    encoder_3d: TuneMode = "frozen"
    encoder_2d: TuneMode = "frozen"
    perceiver: TuneMode = "full"
    fusion: TuneMode = "full"
    """TG-IS parts: the slice projector and, without text scoring, the linear scorer."""
    llm: TuneMode = "frozen"
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA for the LLM."""
    encoder_lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA for any other part in ``lora`` mode."""


@dataclass
class VLMConfig:
    """A whole VolumeVLM: encoders -> perceiver (-> TG-IS) -> LLM."""

    encoder_3d: EncoderSpec
    """The 3D volume encoder."""
    llm: LLMSpec
    """The language model."""
    perceiver: PerceiverSpec = field(default_factory=PerceiverSpec)
    """Maps 3D encoder tokens to LLM-width image tokens."""
    encoder_2d: EncoderSpec | None = None
    """Optional per-slice 2D encoder (Med-2E3); requires ``fusion.name: tgis``."""
    fusion: FusionSpec = field(default_factory=FusionSpec)
    """How 2D slice features join the 3D tokens."""
    tune: TuneSpec = field(default_factory=TuneSpec)
    """Which parts train and how."""
    image_token: str = "<image>"
    """Placeholder added to the tokenizer; one in the prompt becomes M image-token positions."""
    system_prompt: str | None = None
    """System message for chat templates; null = the template's default."""
    max_length: int = 768
    """Longest training sequence (image tokens included); longer answers are cut at the end."""
    frozen_feature_cache_mb: float = 0.0
    """MiB per frozen encoder and process for reusing its outputs on volumes already seen (0 = off).
    With frozen encoders and no augmentation every step after the first epoch skips them; entries
    are keyed by the input's bytes, so an augmented volume is a miss, never a wrong hit. Serving
    processes use it too (several questions about one volume). Not with DeepSpeed ZeRO-3, whose
    partitioned encoders must run on every rank at once."""

    def __post_init__(self):
        if self.frozen_feature_cache_mb < 0:
            raise ValueError(f"frozen_feature_cache_mb must be >= 0, got {self.frozen_feature_cache_mb}")
        if self.fusion.name == "tgis" and self.encoder_2d is None:
            raise ValueError("fusion: 'tgis' needs an encoder_2d")
        if self.encoder_2d is not None and self.fusion.name == "none":
            raise ValueError("encoder_2d: a 2D encoder needs a fusion (fusion.name: tgis)")
