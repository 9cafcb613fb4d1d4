"""The quickstart's model reads the image: after a short training it names the acquisition plane of
held-out volumes, which its blind twin (the same recipe shown zeros) cannot. In-process and small;
the quickstart's learning proof is the full-size check."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import load
from components.data.io import read_volume
from components.data.phantom import PLANES, PhantomConfig, make_phantom_dataset, read_findings
from components.data.preprocess import get_spec, preprocess_volume
from components.models.builders import build_tokenizer, build_vlm
from components.models.tokenizer import refit_tokenizer
from ray_jobs.train_vlm import VLMJobConfig

QUESTION = "In which plane was this scan acquired?"


@pytest.fixture(scope="module")
def plane_cases(tmp_path_factory):
    """(volume (1, 32, 64, 64), plane, split) for 48 small phantoms preprocessed with the quickstart spec."""
    root = tmp_path_factory.mktemp("learn-phantom")
    make_phantom_dataset(str(root), PhantomConfig(n_volumes=48, seed=5, scale=0.3, dicom_fraction=0.0,
                                                  splits=(0.6, 0.0, 0.4)))
    spec = get_spec("quickstart")
    cases = []
    for case in read_findings(str(root)).values():
        vol = read_volume(os.path.join(root, "volumes", f"{case['id']}.nii.gz"))
        cases.append((preprocess_volume(vol, spec).astype(np.float32), case["plane"], case["split"]))
    return cases


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    base = build_tokenizer(load(VLMJobConfig, Path("ray_jobs/configs/cpu/align.yaml")).model.llm)
    out = str(tmp_path_factory.mktemp("tok"))
    refit_tokenizer(base, [QUESTION, *PLANES] * 20, 300).save_pretrained(out)
    return out


def _train_and_test(cases, tokenizer_dir, blind: bool) -> float:
    cfg = load(VLMJobConfig, Path("ray_jobs/configs/quickstart/finetune.yaml"),
               [f"model.llm.tokenizer={tokenizer_dir}", "model.llm.config.vocab_size=320"]).model
    torch.manual_seed(0)
    model = build_vlm(cfg)
    train = [c for c in cases if c[2] == "train"]
    test = [c for c in cases if c[2] == "test"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(150):
        batch = rng.sample(train, 8)
        ex = model.collate([model.build_example(QUESTION, plane) for _, plane, _ in batch])
        volume = torch.tensor(np.stack([v for v, _, _ in batch]))
        loss = model(torch.zeros_like(volume) if blind else volume,
                     **{k: ex[k] for k in ("input_ids", "attention_mask", "labels", "question_ids",
                                           "question_attention_mask")}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    volume = torch.tensor(np.stack([v for v, _, _ in test]))
    answers = model.answer(torch.zeros_like(volume) if blind else volume, [QUESTION] * len(test), max_new_tokens=4)
    return float(np.mean([a.strip().lower().startswith(plane) for a, (_, plane, _) in zip(answers, test)]))


def test_model_reads_the_plane_from_the_image_and_its_blind_twin_cannot(plane_cases, tokenizer_dir):
    test_planes = [p for _, p, s in plane_cases if s == "test"]
    majority = max(test_planes.count(p) for p in PLANES) / len(test_planes)
    trained = _train_and_test(plane_cases, tokenizer_dir, blind=False)
    blind = _train_and_test(plane_cases, tokenizer_dir, blind=True)
    # a model that ignores the image can at best always name the most frequent plane
    print(f"held-out plane accuracy: trained {trained:.2f}, blind {blind:.2f}, majority {majority:.2f}")
    assert blind <= majority + 1e-9
    assert trained >= 0.8 and trained >= majority + 0.3, (trained, blind, majority)
