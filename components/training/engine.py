"""The distributed wrapper chosen by config: torch DDP or DeepSpeed ZeRO, on CPU or GPU.

Both expose the same small surface to the loop: ``step(loss)``, ``lr``, ``save(dir)``,
``load(dir)`` and ``module`` (the unwrapped model), so recipes switch strategy by one YAML line.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from components.training.config import OptimConfig, StrategyConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Warmup then constant / linear / cosine decay, as a LambdaLR multiplier."""
    import math

    warmup = int(round(cfg.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by ``cfg.lr_scale``; the unscaled group, when it has parameters,
    comes first so ``param_groups[0]`` reports the base learning rate. Schedulers multiply every
    group's own lr."""
    keys = sorted(cfg.lr_scale, key=len, reverse=True)
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in keys if name == k or name.startswith(k + ".")), None)
        used.add(key)
        groups.setdefault(cfg.lr_scale[key] if key else 1.0, []).append(p)
    unused = [k for k in keys if k not in used]
    if unused:
        raise ValueError(f"optim.lr_scale.{unused[0]}: matches no trainable parameter of the model")
    return [{"params": ps, "lr": cfg.lr * scale} for scale, ps in groups.items() if ps]


class DDPEngine:
    """torch DistributedDataParallel (or the bare module with one worker)."""

    def __init__(self, model: nn.Module, optim: OptimConfig, strategy: StrategyConfig, total_steps: int,
                 device: torch.device, world_size: int):
        self.module = model.to(device)
        self.device, self.strategy, self.optim_cfg = device, strategy, optim
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            # frozen towers and data-dependent branches leave some parameters without gradients
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        else:
            self.model = model
        self.optimizer = build_optimizer(param_groups(model, optim), optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, total_steps))
        self.micro = 0
        self.scaler = torch.amp.GradScaler(device.type) if strategy.precision == "fp16" else None

    def autocast(self):
        if self.strategy.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.strategy.precision])

    def step(self, loss: torch.Tensor) -> bool:
        """Backward one micro-batch; returns True when an optimizer step was taken."""
        accum = self.strategy.gradient_accumulation_steps
        scaled = loss / accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        self.micro += 1
        if self.micro % accum:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.optim_cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable(self.module), self.optim_cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def writable_weights(self):
        return contextlib.nullcontext()  # every rank holds whole weights

    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(directory, "optimizer.pt"))

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1-3 (optionally offloading optimizer state); also runs on CPU over gloo."""

    def __init__(self, model: nn.Module, optim: OptimConfig, strategy: StrategyConfig, total_steps: int,
                 device: torch.device, world_size: int, micro_batch: int):
        import deepspeed

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.strategy, self.device = strategy, device
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": strategy.gradient_accumulation_steps,
            "optimizer": {"type": "AdamW" if optim.name == "adamw" else "Adam",
                          "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                     "weight_decay": optim.weight_decay,
                                     # torch's Adam avoids compiling cpu_adam when nothing is offloaded
                                     "torch_adam": not strategy.offload_optimizer}},
            "zero_optimization": {"stage": strategy.zero_stage},
            "bf16": {"enabled": strategy.precision == "bf16"},
            "fp16": {"enabled": strategy.precision == "fp16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if optim.max_grad_norm:
            ds_config["gradient_clipping"] = optim.max_grad_norm
        if strategy.offload_optimizer:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        self.ds_config = ds_config
        schedule = lr_lambda(optim, total_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, optim), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.module = self.model.module

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def step(self, loss: torch.Tensor) -> bool:
        self.model.backward(loss)
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        return boundary

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict:
        """Full weights, keyed as ``module.state_dict()``. ZeRO-3 gathers its partitions one module at
        a time and only rank 0 keeps a CPU copy (the others get ``{}``): no device ever holds the
        whole model, which a large frozen LLM could not afford. Every rank must call this."""
        if self.strategy.zero_stage != 3:
            return self.module.state_dict()
        import deepspeed

        keep = torch.distributed.get_rank() == 0
        state = {}
        # remove_duplicate=False: a module registered under two names is saved under both
        for prefix, module in self.module.named_modules(remove_duplicate=False):
            own = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
                if not keep:
                    continue
                tensors = [*module.named_parameters(recurse=False),
                           *((n, b) for n, b in module.named_buffers(recurse=False)
                             if n not in module._non_persistent_buffers_set)]
                for name, t in tensors:
                    # a copy: leaving the context frees the gathered storage (on CPU too)
                    state[f"{prefix}.{name}" if prefix else name] = t.detach().to("cpu", copy=True)
        return state

    def writable_weights(self):
        """A context in which ``module.load_state_dict`` sees whole weights: ZeRO-3 gathers them on every
        rank (a collective) and, on leaving, re-partitions rank 0's values."""
        if self.strategy.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0)

    def save(self, directory: str, rank: int) -> None:
        self.model.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state")

    def load(self, directory: str) -> None:
        self.model.load_checkpoint(os.path.join(directory, "deepspeed"), tag="state")


def build_engine(model: nn.Module, optim: OptimConfig, strategy: StrategyConfig, total_steps: int,
                 device: torch.device, world_size: int, micro_batch: int):
    if strategy.name == "deepspeed":
        return DeepSpeedEngine(model, optim, strategy, total_steps, device, world_size, micro_batch)
    return DDPEngine(model, optim, strategy, total_steps, device, world_size)


def describe(engine) -> str:
    if isinstance(engine, DeepSpeedEngine):
        return json.dumps({"deepspeed": engine.ds_config["zero_optimization"]})
    return "ddp"
