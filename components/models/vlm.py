"""VolumeVLM: 3D encoder (+ per-slice 2D encoder) -> perceiver (-> TG-IS) -> any HF causal LM.

Image embeddings replace the input embeddings at the image placeholder positions of the prompt
(one placeholder token expanded to M positions by ``components.models.text.build_example``).
Each part has a tune mode (``frozen`` | ``full`` | ``lora``). A checkpoint is a directory:

    config.yaml                 the VLMConfig
    encoder_3d.safetensors      one file per saved part (LoRA weights of non-LLM parts included)
    perceiver.safetensors
    encoder_2d.safetensors, fusion.safetensors          (when present)
    llm.safetensors + llm_config/                       LLM base weights when they cannot be reloaded
                                                        from their source (trained fully or built from config)
    llm_adapter/                peft adapter of the LLM (lora mode)
    tokenizer/                  tokenizer with the image token added
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from components.config import dump, load
from components.models.config import LoraSpec, VLMConfig
from components.models.feature_cache import FrozenFeatureCache, sample_digest
from components.models.text import IGNORE_INDEX, build_example, collate

__all__ = ["VolumeVLM", "VolumeVLMOutput", "apply_tune_mode", "lora_config"]

PARTS = ("encoder_3d", "encoder_2d", "perceiver", "fusion", "llm")


@dataclass
class VolumeVLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    slice_scores: torch.Tensor | None = None
    """(B, N) TG-IS slice weights when a 2D branch is fused."""


# --------------------------------------------------------------------------- tune modes
def _linear_names(module: nn.Module) -> list[str]:
    """Names of the Linear layers LoRA can wrap. MultiheadAttention reads its ``out_proj`` weight
    directly rather than calling it, so a wrapper there would be bypassed: skip those."""
    skip = {f"{n}.out_proj" if n else "out_proj" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in skip]


def lora_config(spec: LoraSpec, module: nn.Module | None = None, causal_lm: bool = False):
    from peft import LoraConfig

    targets: Any = spec.target_modules
    if targets == "all-linear" and not causal_lm:
        # peft resolves "all-linear" only for transformers models
        targets = _linear_names(module)
        if not targets:
            raise ValueError(f"LoRA: {type(module).__name__} has no linear layers to adapt")
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      bias=spec.bias, task_type="CAUSAL_LM" if causal_lm else None)


def apply_tune_mode(module: nn.Module, mode: str, lora: LoraSpec | None = None, causal_lm: bool = False) -> nn.Module:
    """Set ``requires_grad`` for a part; ``lora`` wraps it (peft) and returns the wrapped module."""
    if mode == "frozen":
        module.requires_grad_(False)
    elif mode == "full":
        module.requires_grad_(True)
    elif mode == "lora":
        lora = lora or LoraSpec()
        if causal_lm:
            from peft import PeftModel, get_peft_model

            if not isinstance(module, PeftModel):
                module = get_peft_model(module, lora_config(lora, module, causal_lm=True))
        elif not any("lora_" in n for n, _ in module.named_parameters()):
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora_config(lora, module), module)
            for layer in module.modules():
                if isinstance(layer, nn.TransformerEncoderLayer):
                    # torch's fused inference path reads the wrapped Linear weights directly and would
                    # skip the LoRA branch; this flag only gates that path
                    layer.activation_relu_or_gelu = 0
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name or (lora.bias == "all" and name.endswith("bias")))
    else:
        raise ValueError(f"tune mode must be frozen, full or lora, got {mode!r}")
    return module


# --------------------------------------------------------------------------- safetensors helpers
def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): store each once plus an alias map."""
    from safetensors.torch import save_file

    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for key, source in aliases.items():
        state[key] = state[source]
    return state


def _base_llm_state(llm: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LLM's own weights from its ``state`` (keys as ``llm.state_dict()``), without peft's LoRA
    tensors and wrapper names."""
    from peft import PeftModel

    if isinstance(llm, PeftModel):
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def _sub_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of one part (``name.``-prefixed keys), keyed as the part's own ``state_dict()``."""
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _mean_init_new_rows(llm: nn.Module, old_rows: int) -> None:
    """New vocabulary rows = mean of the old ones: deterministic, so a reload rebuilds them exactly."""
    with torch.no_grad():
        for emb in {id(e): e for e in (llm.get_input_embeddings(), llm.get_output_embeddings()) if e is not None}.values():
            w = emb.weight
            if w.shape[0] > old_rows:
                w[old_rows:] = w[:old_rows].mean(0, keepdim=True)


@dataclass
class Answers:
    """What :meth:`VolumeVLM.answer_details` returns for a batch."""

    texts: list[str]
    slice_scores: torch.Tensor | None   # (B, N) TG-IS slice weights, None without a 2D branch
    truncated: list[bool]               # stopped by max_new_tokens, not by the end-of-sequence token


class VolumeVLM(nn.Module):
    """A 3D medical vision-language model built from swappable parts (see ``builders.build_vlm``)."""

    def __init__(self, config: VLMConfig, encoder_3d: nn.Module, perceiver: nn.Module, llm: nn.Module, tokenizer,
                 encoder_2d: nn.Module | None = None, fusion: nn.Module | None = None, apply_tuning: bool = True):
        super().__init__()
        if (encoder_2d is None) != (fusion is None):
            raise ValueError("a 2D encoder and a fusion module come together")
        if fusion is not None and getattr(fusion, "aggregation", None) == "tgis" and "3d" in fusion.scoring_inputs:
            grid = perceiver.out_grid()
            if grid is None:
                raise ValueError(f"TG-IS scoring with 3D features needs perceiver tokens on a 3D grid; "
                                 f"{type(perceiver).__name__} has none (use e.g. spatial_pool_mlp or conv3d)")
            size = getattr(getattr(encoder_3d, "config", None), "volume_size", None)
            if size is not None and size[0] % grid[0]:
                raise ValueError(f"TG-IS: {size[0]} slices are not a multiple of the 3D token grid depth {grid[0]}")
        self.config = config
        self.encoder_3d, self.perceiver, self.encoder_2d, self.fusion = encoder_3d, perceiver, encoder_2d, fusion
        self.tokenizer = tokenizer
        tokenizer.add_tokens([config.image_token], special_tokens=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(config.image_token)
        rows = llm.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            _mean_init_new_rows(llm, rows)
        self.llm = llm
        self.num_image_tokens: int = perceiver.num_tokens
        self.feature_caches: dict[str, FrozenFeatureCache] = {}
        if fusion is not None:
            self.num_image_tokens = fusion.out_tokens(perceiver.num_tokens, encoder_2d.num_tokens)
        if apply_tuning:
            self.apply_tune_modes()

    # ------------------------------------------------------------------ parts and tuning
    def parts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in PARTS if getattr(self, name) is not None}

    def tune_mode(self, part: str) -> str:
        return getattr(self.config.tune, part)

    def apply_tune_modes(self) -> None:
        tune = self.config.tune
        for name, module in self.parts().items():
            is_llm = name == "llm"
            wrapped = apply_tune_mode(module, self.tune_mode(name), tune.lora if is_llm else tune.encoder_lora,
                                      causal_lm=is_llm)
            if wrapped is not module:
                setattr(self, name, wrapped)

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen parts keep inference behaviour (BatchNorm statistics, dropout)
        for name, module in self.parts().items():
            if self.tune_mode(name) == "frozen":
                module.eval()
        return self

    def trainable_parameters(self) -> dict[str, int]:
        # a ZeRO-3 partitioned parameter holds an empty tensor; ds_numel is its full size
        return {name: sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters() if p.requires_grad)
                for name, m in self.parts().items()}

    # ------------------------------------------------------------------ text helpers
    def build_example(self, question: str, answer: str | None = None, max_length: int | None = None) -> dict[str, list[int]]:
        """Token ids, attention mask, labels and question ids for one (question, answer) pair."""
        return build_example(self.tokenizer, question, answer, image_token_id=self.image_token_id,
                             num_image_tokens=self.num_image_tokens, image_token=self.config.image_token,
                             system_prompt=self.config.system_prompt,
                             max_length=self.config.max_length if max_length is None else max_length)

    def collate(self, examples, padding_side: str = "right") -> dict[str, Any]:
        return collate(examples, self.tokenizer.pad_token_id, padding_side)

    # ------------------------------------------------------------------ forward
    def encode_images(self, volume: torch.Tensor, volume_2d: torch.Tensor | None = None,
                      question_ids: torch.Tensor | None = None,
                      question_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image embeddings ``(B, M, D)`` for the LLM and the TG-IS slice scores ``(B, N)`` (or None)."""
        digests: dict[int, list[bytes]] = {}  # per input tensor: both encoders may read the same volume
        enc = self._encode("encoder_3d", volume, digests)
        tokens = self.perceiver(enc)
        if self.fusion is None:
            return tokens, None
        feats_2d = self._encode("encoder_2d", volume if volume_2d is None else volume_2d, digests)
        text = None
        if getattr(self.fusion, "needs_text", False):
            if question_ids is None:
                raise ValueError("TG-IS text scoring needs question_ids (see build_example)")
            text = self.llm.get_input_embeddings()(question_ids)
        out = self.fusion(tokens, self.perceiver.out_grid(enc.grid), feats_2d, text, question_attention_mask)
        return out.tokens, out.scores

    def load_state_dict(self, *args, **kwargs):
        self.feature_caches.clear()  # features of the old weights
        return super().load_state_dict(*args, **kwargs)

    def _encode(self, name: str, x: torch.Tensor, digests: dict[int, list[bytes]] | None = None):
        encoder = getattr(self, name)
        if self.config.frozen_feature_cache_mb <= 0 or self.tune_mode(name) != "frozen":
            return encoder(x)
        if name not in self.feature_caches:
            self.feature_caches[name] = FrozenFeatureCache(self.config.frozen_feature_cache_mb)
        keys = None
        if digests is not None:
            if id(x) not in digests:
                digests[id(x)] = [sample_digest(s) for s in x]
            keys = digests[id(x)]
        return self.feature_caches[name](encoder, x, keys)

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholder positions replaced by ``image_embeds``."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(1)
        if (counts != image_embeds.shape[1]).any():
            raise ValueError(f"each sequence needs {image_embeds.shape[1]} image positions, found {counts.tolist()}")
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, volume: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, question_ids: torch.Tensor | None = None,
                question_attention_mask: torch.Tensor | None = None, volume_2d: torch.Tensor | None = None,
                **llm_kwargs) -> VolumeVLMOutput:
        """Logits over the whole sequence; with ``labels``, the mean next-token loss on the answer and
        logits for the sequence's tail only, from the position before the earliest answer token on."""
        image_embeds, scores = self.encode_images(volume, volume_2d, question_ids, question_attention_mask)
        embeds = self.embed_inputs(input_ids, image_embeds)
        if labels is None:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **llm_kwargs)
            return VolumeVLMOutput(logits=out.logits, slice_scores=scores)
        labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        # Only positions that predict an answer token need the LM head. Image and prompt tokens
        # make up most of a sequence, and the head's vocabulary-wide matmul dominates small models.
        labelled = (labels != IGNORE_INDEX).any(0).nonzero()
        first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
        keep = labels.shape[1] - max(first - 1, 0)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=keep, **llm_kwargs)
        logits = out.logits[:, :-1].float()
        targets = labels[:, labels.shape[1] - keep + 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE_INDEX)
        return VolumeVLMOutput(loss=loss, logits=out.logits, slice_scores=scores)

    @torch.no_grad()
    def generate(self, volume: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 question_ids: torch.Tensor | None = None, question_attention_mask: torch.Tensor | None = None,
                 volume_2d: torch.Tensor | None = None, return_slice_scores: bool = False,
                 **generate_kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """New token ids only (prompts must be left-padded). Greedy unless told otherwise.
        ``return_slice_scores`` also returns the TG-IS slice scores ``(B, N)`` (None without a 2D branch)."""
        image_embeds, scores = self.encode_images(volume, volume_2d, question_ids, question_attention_mask)
        embeds = self.embed_inputs(input_ids, image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        generate_kwargs.setdefault("suppress_tokens", [self.image_token_id])
        if not generate_kwargs["do_sample"]:
            for k in ("temperature", "top_p", "top_k"):  # silence sampling defaults a model config may carry
                generate_kwargs.setdefault(k, None)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        return (out, scores) if return_slice_scores else out

    @torch.no_grad()
    def answer(self, volume: torch.Tensor, questions: str | list[str], max_new_tokens: int = 64,
               return_slice_scores: bool = False, **generate_kwargs) -> list[str] | tuple[list[str], torch.Tensor | None]:
        """Decoded answers for a batch of volumes ``(B, 1, D, H, W)`` and one question per volume
        (with ``return_slice_scores``, also the TG-IS slice scores ``(B, N)`` or None)."""
        out = self.answer_details(volume, questions, max_new_tokens, **generate_kwargs)
        return (out.texts, out.slice_scores) if return_slice_scores else out.texts

    @torch.no_grad()
    def answer_details(self, volume: torch.Tensor, questions: str | list[str], max_new_tokens: int = 64,
                       **generate_kwargs) -> Answers:
        """:meth:`answer` with the slice scores and which answers ran out of ``max_new_tokens`` before the
        end-of-sequence token (cut off: a truncated report loses the findings it did not reach)."""
        questions = [questions] * volume.shape[0] if isinstance(questions, str) else list(questions)
        batch = self.collate([self.build_example(q) for q in questions], padding_side="left")
        device = volume.device
        out, scores = self.generate(volume, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    batch["question_ids"].to(device), batch["question_attention_mask"].to(device),
                                    max_new_tokens=max_new_tokens, return_slice_scores=True, **generate_kwargs)
        texts = [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        eos = self.llm.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=out.device)
        ended = torch.isin(out, eos).any(dim=1) if eos.numel() else torch.zeros(len(texts), dtype=torch.bool)
        truncated = [bool(out.shape[1] >= max_new_tokens and not e) for e in ended.tolist()]
        return Answers(texts, scores, truncated)

    # ------------------------------------------------------------------ checkpoints
    def _llm_base_reloadable(self) -> bool:
        return self.config.llm.source == "pretrained" and self.tune_mode("llm") != "full"

    def save_pretrained(self, directory: str | os.PathLike, include_frozen: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the checkpoint directory. ``include_frozen=False`` skips frozen encoders that have a
        ``checkpoint`` to reload from. A pretrained LLM that was not fully trained is never copied.

        ``state_dict`` (keys as ``self.state_dict()``) supplies the weights when this module's own are
        not whole, e.g. partitioned across ranks by DeepSpeed ZeRO-3 and gathered by the caller."""
        from peft import PeftModel

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        dump(self.config, out / "config.yaml")
        for name in ("encoder_3d", "encoder_2d", "perceiver", "fusion"):
            module = getattr(self, name)
            if module is None:
                continue
            spec = getattr(self.config, name, None)
            if not include_frozen and self.tune_mode(name) == "frozen" and getattr(spec, "checkpoint", None):
                continue
            _save_state(_sub_state(state, name), out / f"{name}.safetensors")
        if not self._llm_base_reloadable():
            _save_state(_base_llm_state(self.llm, _sub_state(state, "llm")), out / "llm.safetensors")
            base = self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm
            base.config.save_pretrained(str(out / "llm_config"))
        if isinstance(self.llm, PeftModel):
            # new vocabulary rows are rebuilt deterministically, so the adapter need not carry embeddings
            self.llm.save_pretrained(str(out / "llm_adapter"), save_embedding_layers=False,
                                     state_dict=_sub_state(state, "llm"))
        self.tokenizer.save_pretrained(str(out / "tokenizer"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, overrides: list[str] | None = None) -> "VolumeVLM":
        """Rebuild a model written by ``save_pretrained`` (no pickles are read).

        ``overrides`` (``key=value``) may change tune modes, e.g. ``tune.llm=frozen`` merges the LLM's
        LoRA adapter into its weights, ``tune.llm=lora`` on a stage-1 checkpoint starts stage 2.
        """
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from components.models import builders

        src = Path(directory)
        saved_cfg = load(VLMConfig, src / "config.yaml")  # the structure the weights were saved with
        cfg = load(VLMConfig, src / "config.yaml", overrides) if overrides else saved_cfg
        tokenizer = AutoTokenizer.from_pretrained(str(src / "tokenizer"), local_files_only=True)

        def saved(name: str) -> Path | None:
            path = src / f"{name}.safetensors"
            return path if path.exists() else None

        encoder_3d = builders.build_encoder(cfg.encoder_3d, load_checkpoint=saved("encoder_3d") is None)
        encoder_2d = None
        if cfg.encoder_2d is not None:
            encoder_2d = builders.build_encoder(cfg.encoder_2d, load_checkpoint=saved("encoder_2d") is None)
        if saved("llm"):
            llm_cfg = AutoConfig.from_pretrained(str(src / "llm_config"))
            kwargs = {"dtype": getattr(torch, cfg.llm.dtype)}
            if cfg.llm.attn_implementation:
                kwargs["attn_implementation"] = cfg.llm.attn_implementation
            llm = AutoModelForCausalLM.from_config(llm_cfg, **kwargs)
            llm.load_state_dict(_load_state(saved("llm")), strict=True)
        else:
            llm, _ = builders.build_llm(cfg.llm, with_tokenizer=False)
        dim = builders.llm_hidden_size(llm.config)
        perceiver = builders.build_perceiver(cfg.perceiver, dim, encoder_3d)
        fusion = builders.build_fusion(cfg.fusion, dim, encoder_2d.out_dim) if encoder_2d is not None else None
        model = cls(cfg, encoder_3d, perceiver, llm, tokenizer, encoder_2d=encoder_2d, fusion=fusion, apply_tuning=False)
        for name in ("encoder_3d", "encoder_2d", "perceiver", "fusion"):
            module = getattr(model, name)
            if module is None:
                continue
            if getattr(saved_cfg.tune, name) == "lora":
                apply_tune_mode(module, "lora", saved_cfg.tune.encoder_lora)
            if saved(name):
                module.load_state_dict(_load_state(saved(name)), strict=True)
        if (src / "llm_adapter").exists():
            keep_lora = cfg.tune.llm == "lora"
            model.llm = PeftModel.from_pretrained(model.llm, str(src / "llm_adapter"), is_trainable=keep_lora)
            if not keep_lora:  # e.g. tune.llm=frozen for serving: fold the adapter into the weights
                model.llm = model.llm.merge_and_unload()
        model.apply_tune_modes()
        return model
