"""Parameters, tokens into the LLM and forward GFLOPs per part of a VolumeVLM config.

    python -m components.models.summary --config components/models/presets/med3dvlm.yaml
    python -m components.models.summary --config components/models/presets/e3d_gpt.yaml encoder_3d.overrides.depth=2

By default the model is built on PyTorch's ``meta`` device: shapes and FLOPs are exact, no weights
are allocated or loaded, so full-scale presets (7B LLMs included) summarise in seconds on a laptop.
The LLM architecture comes from ``llm.config`` (or the local model directory's config.json).
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` for one volume and a prompt of
``--text-tokens`` text tokens after the image tokens (matmuls, convolutions and attention; 1 MAC = 2 FLOPs).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from components.config import ConfigError, load
from components.models import builders
from components.models.config import VLMConfig
from components.models.vlm import apply_tune_mode

__all__ = ["PartSummary", "summarize", "format_summary", "main"]


@dataclass
class PartSummary:
    part: str
    module: str
    params: int
    trainable: int
    tokens_out: int
    """Tokens the part emits (for the LLM: the sequence length it reads)."""
    gflops: float
    tune: str


def _count(module: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in module.parameters())
    return params, sum(p.numel() for p in module.parameters() if p.requires_grad)


def _flops(fn) -> tuple[object, float]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops() / 1e9


def summarize(cfg: VLMConfig, text_tokens: int = 64, device: str = "meta",
              volume_size: tuple[int, int, int] | None = None) -> dict:
    """Build the parts of ``cfg`` on ``device`` and measure them; returns a JSON-ready dict."""
    from transformers import AutoModelForCausalLM

    tune = cfg.tune
    with torch.device(device):
        encoder_3d = builders.build_encoder(cfg.encoder_3d, load_checkpoint=device != "meta")
        llm_cfg = builders.build_llm_config(cfg.llm)
        llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=getattr(torch, cfg.llm.dtype))
        dim = builders.llm_hidden_size(llm_cfg)
        perceiver = builders.build_perceiver(cfg.perceiver, dim, encoder_3d)
        encoder_2d = fusion = None
        if cfg.encoder_2d is not None:
            encoder_2d = builders.build_encoder(cfg.encoder_2d, load_checkpoint=device != "meta")
            fusion = builders.build_fusion(cfg.fusion, dim, encoder_2d.out_dim)
        parts = {"encoder_3d": encoder_3d, "encoder_2d": encoder_2d, "perceiver": perceiver, "fusion": fusion, "llm": llm}
        for name, module in list(parts.items()):
            if module is not None:
                lora = tune.lora if name == "llm" else tune.encoder_lora
                parts[name] = apply_tune_mode(module, getattr(tune, name), lora, causal_lm=name == "llm")
                parts[name].train()  # train mode keeps attention on the counted (non-fused) path

    size = volume_size or builders.encoder_volume_size(encoder_3d)
    if size is None:
        raise ValueError("the 3D encoder does not record its input size; pass volume_size")
    rows: list[PartSummary] = []

    def add(name: str, tokens_out: int, gflops: float) -> None:
        module = parts[name]
        params, trainable = _count(module)
        kind = type(module).__name__
        if hasattr(module, "get_base_model"):  # peft wrapper
            kind = type(module.get_base_model()).__name__ + "+LoRA"
        rows.append(PartSummary(name, kind, params, trainable, int(tokens_out), gflops,
                                getattr(tune, name)))

    with torch.no_grad():
        volume = torch.zeros(1, 1, *size, device=device)
        enc, g = _flops(lambda: parts["encoder_3d"](volume))
        add("encoder_3d", enc.tokens.shape[1], g)
        image, g = _flops(lambda: parts["perceiver"](enc))
        add("perceiver", image.shape[1], g)
        slice_scores = None
        if encoder_2d is not None:
            feats, g = _flops(lambda: parts["encoder_2d"](volume))
            add("encoder_2d", feats.shape[1] * feats.shape[2], g)
            text = torch.zeros(1, text_tokens, dim, device=device)
            out, g = _flops(lambda: parts["fusion"](image, perceiver.out_grid(enc.grid), feats, text, None))
            image, slice_scores = out.tokens, out.scores
            add("fusion", image.shape[1], g)
        embeds = torch.zeros(1, image.shape[1] + text_tokens, dim, device=device, dtype=getattr(torch, cfg.llm.dtype))
        _, g = _flops(lambda: parts["llm"](inputs_embeds=embeds))
        add("llm", embeds.shape[1], g)

    return {
        "volume_size": list(size),
        "image_tokens": int(image.shape[1]),
        "text_tokens": text_tokens,
        "slices": None if slice_scores is None else int(slice_scores.shape[1]),
        "parts": [asdict(r) for r in rows],
        "total_params": sum(r.params for r in rows),
        "total_trainable": sum(r.trainable for r in rows),
        "total_gflops": sum(r.gflops for r in rows),
    }


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_summary(s: dict) -> str:
    head = f"{'part':<11} {'module':<26} {'tune':<6} {'params':>9} {'trainable':>9} {'tokens out':>10} {'GFLOPs':>10}"
    lines = [f"volume {'x'.join(map(str, s['volume_size']))} (D x H W), {s['image_tokens']} image tokens + "
             f"{s['text_tokens']} text tokens into the LLM", head, "-" * len(head)]
    for r in s["parts"]:
        lines.append(f"{r['part']:<11} {r['module'][:26]:<26} {r['tune']:<6} {_human(r['params']):>9} "
                     f"{_human(r['trainable']):>9} {r['tokens_out']:>10} {r['gflops']:>10.2f}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<11} {'':<26} {'':<6} {_human(s['total_params']):>9} {_human(s['total_trainable']):>9} "
                 f"{'':>10} {s['total_gflops']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Parameters, LLM tokens and forward GFLOPs per VolumeVLM part.")
    parser.add_argument("--config", required=True, help="VLM config YAML (e.g. components/models/presets/*.yaml)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens after the image tokens")
    parser.add_argument("--device", default="meta",
                        help="'meta' (shapes only, default) or a real device; on CPU the fused attention kernel "
                             "escapes the FLOP counter, so attention FLOPs are only counted on meta")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (value parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        cfg = load(VLMConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = summarize(cfg, text_tokens=args.text_tokens, device=args.device)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
