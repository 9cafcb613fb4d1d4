"""Refitting the LLM tokenizer to a dataset's training text (ray_jobs.train_tokenizer)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from components.config import ConfigError, load
from components.data.prompts import format_sample
from components.models.text import format_prompt
from ray_jobs.train_tokenizer import TokenizerJobConfig, run

RECIPE = Path("ray_jobs/configs/tokenizer/phantom.yaml")


@pytest.fixture(scope="module")
def refitted(train_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tokenizer"))
    summary = run(load(TokenizerJobConfig, RECIPE, [f"data_path={train_shards}", f"output={out}"]))
    return summary, out


def test_refitted_tokenizer_is_small_and_encodes_unseen_text_losslessly(refitted, train_shards):
    from transformers import AutoTokenizer

    from components.models.builders import build_tokenizer

    summary, out = refitted
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    base = build_tokenizer(load(TokenizerJobConfig, RECIPE).base)
    assert 256 < len(tok) <= 1024 < len(base) and summary["vocab"] == len(tok)
    held_out = pq.read_table(f"{train_shards}/samples.parquet", filters=[("split", "=", "test")]).to_pylist()
    assert held_out
    for sample in held_out[:50]:
        question, answer = format_sample(sample)
        text = format_prompt(tok, question) + answer
        assert tok.decode(tok(text)["input_ids"]) == text
        # the chat template and special tokens are the base tokenizer's
        assert format_prompt(tok, question) == format_prompt(base, question)


def test_quickstart_vlm_trains_with_the_refitted_tokenizer(refitted):
    from components.models.builders import build_vlm

    _, out = refitted
    from ray_jobs.train_vlm import VLMJobConfig

    recipe = load(VLMJobConfig,
                  Path("ray_jobs/configs/quickstart/finetune.yaml"), [f"model.llm.tokenizer={out}"])
    torch.manual_seed(0)
    model = build_vlm(recipe.model)
    # the image token is added on top of the refitted vocabulary, within the config's rows
    assert len(model.tokenizer) <= recipe.model.llm.config["vocab_size"]
    assert model.llm.get_input_embeddings().weight.shape[0] == recipe.model.llm.config["vocab_size"]
    batch = model.collate([model.build_example("Which plane?", "A. axial")] * 2)
    volume = torch.rand(2, 1, 32, 64, 64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(volume, **{k: batch[k] for k in ("input_ids", "attention_mask", "labels",
                                                      "question_ids", "question_attention_mask")}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("override, field", [("vocab_size=100", "vocab_size"), ("output=s3://b/tok", "output")])
def test_bad_tokenizer_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load(TokenizerJobConfig, RECIPE, [override])
