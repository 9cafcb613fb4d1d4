"""The quickstart: make the phantom CT dataset and preprocess it on a local Ray cluster.

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
class QuickstartConfig:
    """Every stage of the quickstart, each with its job's own config."""

    phantom: MakePhantomConfig = field(default_factory=MakePhantomConfig)
    """Step 1: the dataset."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Step 2: raw volumes -> training shards."""


def run(cfg: QuickstartConfig) -> dict:
    t0 = time.time()
    print("== 1/2 make the phantom CT dataset", flush=True)
    make_phantom(cfg.phantom)
    print("== 2/2 preprocess it with Ray Data", flush=True)
    summary = preprocess(cfg.preprocess)
    v, s = summary["volumes"], summary["samples"]
    print("\n== quickstart summary")
    print(f"dataset     {cfg.phantom.output} ({cfg.phantom.phantom.n_volumes} CT volumes with reports and VQA)")
    print(f"shards      {cfg.preprocess.output}/volumes (spec {summary['spec']['name']}, "
          f"shape (1, {', '.join(map(str, summary['spec']['size']))}))")
    print(f"volumes     in {v['in']} = out {v['out']} + quarantined {v['quarantined']}")
    print(f"samples     {s['out']} kept, {s['quarantined']} quarantined (see quarantine.csv)")
    print(f"time        {time.time() - t0:.0f} s")
    return summary


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
