"""The model summary runs on every shipped preset and reports the papers' token counts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import load
from components.models.config import VLMConfig
from components.models.summary import main, summarize

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "components" / "models" / "presets").glob("*.yaml"))
IMAGE_TOKENS = {"e3d_gpt": 343, "m3d": 256, "med2e3": 256 + 256, "med3dvlm": 256, "tiny": 8, "tiny_2e3": 8 + 16}

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_every_preset_is_expected():
    assert {p.stem for p in PRESETS} == set(IMAGE_TOKENS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_summary_runs_on_preset(preset, capsys):
    # built on the meta device: full-size presets (7B LLMs included) cost shapes only
    assert main(["--config", str(preset), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["image_tokens"] == IMAGE_TOKENS[preset.stem]
    parts = {r["part"]: r for r in s["parts"]}
    assert parts["llm"]["tokens_out"] == s["image_tokens"] + s["text_tokens"]
    assert all(r["gflops"] > 0 and r["params"] > 0 for r in s["parts"])
    cfg = load(VLMConfig, preset)
    for name, r in parts.items():
        assert r["tune"] == getattr(cfg.tune, name)
        assert (r["trainable"] == 0) == (r["tune"] == "frozen")
        if r["tune"] == "full":
            assert r["trainable"] == r["params"]
    assert s["total_params"] == sum(r["params"] for r in s["parts"])


def test_paper_numbers_in_the_summary():
    e3d = summarize(load(VLMConfig, ROOT / "components/models/presets/e3d_gpt.yaml"))
    enc = {r["part"]: r for r in e3d["parts"]}
    assert enc["encoder_3d"]["tokens_out"] == 2744 and enc["perceiver"]["tokens_out"] == 343
    med2e3 = summarize(load(VLMConfig, ROOT / "components/models/presets/med2e3.yaml"))
    parts = {r["part"]: r for r in med2e3["parts"]}
    assert parts["encoder_3d"]["tokens_out"] == 2048 and parts["perceiver"]["tokens_out"] == 256
    assert med2e3["slices"] == 32 and parts["encoder_2d"]["tokens_out"] == 32 * 256


def test_dcformer_vs_vit_at_128x256x256():
    cfg = ROOT / "components/models/presets/med3dvlm.yaml"
    dc = summarize(load(VLMConfig, cfg))
    vit = summarize(load(VLMConfig, cfg, ["encoder_3d.name=vit3d", "encoder_3d.preset=m3d_vit",
                                          "encoder_3d.overrides={volume_size: [128, 256, 256]}",
                                          "perceiver.name=spatial_pool_mlp"]))
    assert dc["volume_size"] == vit["volume_size"] == [128, 256, 256]
    g = {name: {r["part"]: r["gflops"] for r in s["parts"]} for name, s in (("dc", dc), ("vit", vit))}
    assert g["dc"]["encoder_3d"] < g["vit"]["encoder_3d"] / 10
    assert vit["image_tokens"] == 32 * 16 * 16 // 8


def test_cli_prints_a_table_and_rejects_bad_configs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "components.models.summary", "--config",
                          str(ROOT / "components/models/presets/tiny.yaml"), "encoder_3d.overrides.depth=1"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "GFLOPs" in run.stdout and "8 image tokens" in run.stdout
    for part in ("encoder_3d", "perceiver", "llm", "total"):
        assert part in run.stdout
    bad = subprocess.run([sys.executable, "-m", "components.models.summary", "--config",
                          str(ROOT / "components/models/presets/tiny.yaml"), "tune.llm=qlora"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and "tune.llm" in bad.stderr
