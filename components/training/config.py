"""Typed config sections shared by every training recipe.

A recipe is ``model`` (stage-specific) plus these sections; the same recipe runs on a CPU laptop
and on a GPU cluster by changing ``scaling`` and ``strategy`` only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from components.data.storage import StorageConfig


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adam"] = "adamw"
    """Optimizer (E3D-GPT uses Adam)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) or L2 (adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warmup (Med3DVLM: cosine)."""
    warmup_ratio: float = 0.0
    """Share of all steps spent warming up linearly (Med3DVLM: 0.03)."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping; null disables it."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name prefix, e.g. ``{fusion: 5.0}`` trains the TG-IS
    fusion at 5x ``lr`` (LLaVA's ``mm_projector_lr`` generalised). Keys are module paths of the model
    being trained (VLM parts: encoder_3d, encoder_2d, perceiver, fusion, llm); the longest matching
    prefix wins; a key matching no trainable parameter fails at the start of training."""

    def __post_init__(self):
        for key, scale in self.lr_scale.items():
            if not key or scale <= 0:
                raise ValueError(f"lr_scale.{key}: multipliers must be positive and keys non-empty, got {scale}")


@dataclass
class StrategyConfig:
    """How the model is distributed. Nothing here is GPU-only: DeepSpeed runs on CPU too."""

    name: Literal["ddp", "deepspeed"] = "ddp"
    """``ddp``: torch DistributedDataParallel; ``deepspeed``: ZeRO through DeepSpeed's engine."""
    zero_stage: int = 2
    """ZeRO stage for DeepSpeed (1, 2 or 3)."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (DeepSpeed; compiles cpu_adam once)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision: fp32 on CPU, bf16 on modern GPUs."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl with GPUs, gloo without."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")


@dataclass
class ScalingSection:
    """Ray Train's ScalingConfig, as data."""

    num_workers: int = 2
    """Training workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """Give each worker a GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra resources per worker (e.g. an accelerator type)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed across nodes."""


@dataclass
class AugmentConfig:
    """Seeded MONAI intensity augmentation (spatial flips would corrupt left/right answers)."""

    enabled: bool = True
    """Augment training volumes."""
    scale_prob: float = 0.5
    """Probability of random intensity scaling (factor 0.1, as M3D)."""
    shift_prob: float = 0.5
    """Probability of a random intensity shift (offset 0.1, as M3D)."""
    noise_prob: float = 0.0
    """Probability of Gaussian noise (std 0.01)."""


@dataclass
class DataSection:
    """Where the preprocessed shards are and how batches are drawn from them."""

    path: str = "data/preprocessed/phantom-quickstart"
    """Output folder (or s3:// prefix) of ``ray_jobs.preprocess``."""
    split: str = "train"
    """Split to train on."""
    tasks: list[str] = field(default_factory=lambda: ["caption", "vqa_closed", "vqa_open", "vqa_yn"])
    """Sample tasks to train on (VLM stages)."""
    batch_size: int = 2
    """Micro-batch per worker."""
    shuffle_buffer: int = 64
    """Rows in each worker's local shuffle buffer (0 = no shuffle)."""
    limit: int | None = None
    """Use only the first N rows (smoke runs)."""
    val_split: str = "validation"
    """Split the periodic validation pass reads (``run.val_every_n_steps``)."""
    val_batches: int = 4
    """Batches per worker in each validation pass (its first ones, read once and kept in memory: every
    pass sees the same)."""
    cpus_per_task: float = 0.1
    """CPUs each Ray Data read/filter task reserves while streaming to the trainers."""
    prefetch_batches: int = 2
    """Batches each worker's Ray Data iterator prepares ahead of the training step."""
    replay_mb: int = 1024
    """When every worker's shard is at most this many MiB and the run lasts several epochs, each worker
    keeps its shard in memory after the first epoch and replays it reshuffled, instead of Ray Data
    restarting its pipeline each epoch (seconds per restart); 0 = stream every epoch."""
    images: Literal["real", "zeros", "shuffled"] = "real"
    """VLM stages: ``zeros`` or ``shuffled`` (volumes rotated one place within each batch) train a
    blind baseline with the same recipe, to show how much the image informs the answers."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time augmentation."""


@dataclass
class CheckpointSection:
    """When checkpoints are written and how many are kept."""

    every_n_steps: int = 100
    """Checkpoint cadence in optimizer steps (and always at the end)."""
    num_to_keep: int = 2
    """Checkpoints kept in storage."""


@dataclass
class RunSection:
    """Identity, length and fault tolerance of a run."""

    name: str = "run"
    """Run name: re-running with the same name and storage resumes from its latest checkpoint."""
    storage_path: str = "runs"
    """Local folder or s3:// prefix for checkpoints and logs."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    report_every_n_steps: int = 10
    """Metrics cadence. Ray Train's controller collects one report per worker every 2 s
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a report blocks training until the previous one has been
    collected: choose N so that N steps take a few seconds at least (``report_wait_s`` shows the cost)."""
    val_every_n_steps: int | None = None
    """Validation-loss cadence in optimizer steps (and always at the end); null = no validation.
    The loss is reported as ``val_loss`` (what a sweep's ASHA scheduler compares)."""
    max_failures: int = 0
    """Worker-group restarts allowed (FailureConfig); -1 = unlimited."""
    seed: int = 0
    """Seeds model init, shuffling and augmentation (plus the worker rank)."""
    init_from: str | None = None
    """Checkpoint of a previous stage to start from (e.g. align -> finetune)."""

    def __post_init__(self):
        if self.val_every_n_steps is not None and self.val_every_n_steps < 1:
            raise ValueError(f"val_every_n_steps must be >= 1 (or null), got {self.val_every_n_steps}")


@dataclass
class TrainingSections:
    """Sections every training job shares."""

    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
