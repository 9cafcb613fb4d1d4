"""The quickstart: phantom CT dataset -> Ray Data preprocessing -> align -> finetune, on a local Ray cluster.

    python -m ray_jobs.quickstart [--config ray_jobs/configs/quickstart.yaml] [key.sub=value ...]
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from components.config import load
from ray_jobs.make_phantom import MakePhantomConfig
from ray_jobs.make_phantom import run as make_phantom
from ray_jobs.preprocess import PreprocessConfig
from ray_jobs.preprocess import run as preprocess

DEFAULT_CONFIG = "ray_jobs/configs/quickstart.yaml"


@dataclass
class RecipeRef:
    """A training recipe file plus ``key.sub=value`` overrides."""

    recipe: str
    """Path of the recipe YAML."""
    overrides: list[str] = field(default_factory=list)
    """Changes applied on top of it."""


@dataclass
class QuickstartConfig:
    """Every stage of the quickstart, each with its job's own config."""

    phantom: MakePhantomConfig = field(default_factory=MakePhantomConfig)
    """Step 1: the dataset."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Step 2: raw volumes -> training shards."""
    align: RecipeRef | None = None
    """Step 3: stage-1 tuning (perceiver only); its data.path is the preprocess output."""
    finetune: RecipeRef | None = None
    """Step 4: stage-2 tuning (perceiver + LoRA) from the align run."""
    runs: str = "runs/quickstart"
    """Where the training runs keep checkpoints, logs and loss curves."""


def _train(ref: RecipeRef, cfg: QuickstartConfig, extra: list[str]) -> dict:
    from components.config import load as load_cfg
    from ray_jobs.train_common import fit
    from ray_jobs.train_vlm import VLMJobConfig

    job = load_cfg(VLMJobConfig, ref.recipe, [f"data.path={cfg.preprocess.output}",
                                              f"run.storage_path={cfg.runs}", *extra, *ref.overrides])
    return fit(job, "ray_jobs.train_vlm.VLMJobConfig")


def run(cfg: QuickstartConfig) -> dict:
    t0 = time.time()
    n = 2 + (cfg.align is not None) + (cfg.finetune is not None)
    print(f"== 1/{n} make the phantom CT dataset", flush=True)
    make_phantom(cfg.phantom)
    print(f"== 2/{n} preprocess it with Ray Data", flush=True)
    summary = preprocess(cfg.preprocess)
    trained = {}
    if cfg.align is not None:
        print(f"== 3/{n} align: train the perceiver (encoder and LLM frozen)", flush=True)
        trained["align"] = _train(cfg.align, cfg, [])
    if cfg.finetune is not None:
        print(f"== {n}/{n} finetune: perceiver + LoRA, from the align checkpoint", flush=True)
        init = [f"run.init_from={trained['align']['checkpoint']}"] if "align" in trained else []
        trained["finetune"] = _train(cfg.finetune, cfg, init)
    v, s = summary["volumes"], summary["samples"]
    print("\n== quickstart summary")
    print(f"dataset     {cfg.phantom.output} ({cfg.phantom.phantom.n_volumes} CT volumes with reports and VQA)")
    print(f"shards      {cfg.preprocess.output}/volumes (spec {summary['spec']['name']}, "
          f"shape (1, {', '.join(map(str, summary['spec']['size']))}))")
    print(f"volumes     in {v['in']} = out {v['out']} + quarantined {v['quarantined']}")
    print(f"samples     {s['out']} kept, {s['quarantined']} quarantined (see quarantine.csv)")
    for name, t in trained.items():
        final = (t["final"] or {}).get("loss")
        print(f"{name:11s} loss {t['first_loss']:.3f} -> {final:.3f} over {t['steps']} steps; "
              f"checkpoint {t['checkpoint']}")
        print(f"{'':11s} loss curve {t['loss_curve']}")
    print(f"time        {time.time() - t0:.0f} s")
    return {"preprocess": summary, **trained}


def main(argv=None):
    import argparse

    from components.config import ConfigError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load(QuickstartConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    run(cfg)


if __name__ == "__main__":
    main()
