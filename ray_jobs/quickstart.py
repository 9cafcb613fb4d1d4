"""The quickstart: phantom CT dataset -> Ray Data preprocessing -> tokenizer refitted to the training
text -> contrastive pretraining of the 3D and the per-slice encoder -> align -> finetune -> evaluation
through Ray Serve -> paper-style tables and the learning proof, on a local Ray cluster.

    python -m ray_jobs.quickstart [--config ray_jobs/configs/quickstart.yaml] [key.sub=value ...]

The proof needs a blind twin: the same recipe trained and evaluated with every volume replaced by
zeros. The trained model must beat chance on held-out closed-ended VQA where the twin cannot, write
reports closer to the reference (METEOR), and, being a TG-IS model, look at the lesion's slices.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

from components.config import load, to_dict
from ray_jobs.make_phantom import MakePhantomConfig
from ray_jobs.make_phantom import run as make_phantom
from ray_jobs.preprocess import PreprocessConfig, spec_conflict
from ray_jobs.preprocess import run as preprocess

DEFAULT_CONFIG = "ray_jobs/configs/quickstart.yaml"


@dataclass
class RecipeRef:
    """A recipe file plus ``key.sub=value`` overrides."""

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
    tokenizer: RecipeRef | None = None
    """Refit the LLM's tokenizer to the training text (a ``ray_jobs.train_tokenizer`` config); the VLM
    stages use it in place of their recipe's ``model.llm.tokenizer``."""
    pretrain: RecipeRef | None = None
    """Contrastive pretraining of the 3D encoder (a ``ray_jobs.pretrain_contrastive`` recipe); the VLM
    stages start from its encoder and the evaluation reports its image-text retrieval."""
    pretrain_2d: RecipeRef | None = None
    """Contrastive pretraining of the per-slice 2D encoder (a ``ray_jobs.pretrain_contrastive`` recipe with
    ``encoder.name: slice2d``); the VLM stages load it as their ``model.encoder_2d``."""
    align: RecipeRef | None = None
    """Stage-1 tuning (perceiver only); its data.path is the preprocess output."""
    finetune: RecipeRef | None = None
    """Stage-2 tuning from the align run."""
    blind: bool = True
    """Also train the blind twin (same recipes, ``data.images=zeros``) and run the learning proof."""
    evaluate: RecipeRef | None = None
    """Evaluation through Ray Serve (a ``ray_jobs.evaluate`` config); model and data are filled in."""
    runs: str = "runs/quickstart"
    """Where the training runs keep checkpoints, logs and loss curves."""
    results: str = "results/quickstart"
    """Where evaluations, tables, plots and the learning proof go."""
    require_proof: bool = False
    """Exit with status 1 when the learning proof fails (a CI gate on learning). Otherwise the exit status
    says whether every stage ran, and the proof's verdict is printed and written to ``proof.json``."""

    def __post_init__(self):
        # every stage's recipe and overrides are checked here, not when the stage starts minutes in
        from components.config import ConfigError

        for name, job_class in _stage_configs().items():
            ref = getattr(self, name)
            if ref is not None:
                try:
                    load(job_class, ref.recipe, ref.overrides)
                except ConfigError as e:
                    raise ConfigError(f"{name}: {e}") from None


def _stage_configs() -> dict[str, type]:
    from ray_jobs.evaluate import EvaluateConfig
    from ray_jobs.pretrain_contrastive import ContrastiveJobConfig
    from ray_jobs.train_tokenizer import TokenizerJobConfig
    from ray_jobs.train_vlm import VLMJobConfig

    return {"tokenizer": TokenizerJobConfig, "pretrain": ContrastiveJobConfig, "pretrain_2d": ContrastiveJobConfig,
            "align": VLMJobConfig, "finetune": VLMJobConfig, "evaluate": EvaluateConfig}


def _preprocess_once(cfg: QuickstartConfig, phantom: dict) -> dict:
    """Preprocess, reusing shards made from this very phantom with this spec (preprocessing resumes by
    volume id, so shards of a phantom made with other settings or another spec are cleared first)."""
    stamp = os.path.join(cfg.preprocess.output, "phantom.json")
    made_from = json.dumps(phantom["config"], sort_keys=True)
    if os.path.isdir(cfg.preprocess.output):
        same = (os.path.exists(stamp) and open(stamp, encoding="utf-8").read() == made_from
                and spec_conflict(cfg.preprocess, to_dict(cfg.preprocess.storage)) is None)
        if not same:
            shutil.rmtree(cfg.preprocess.output)
    summary = preprocess(cfg.preprocess)
    with open(stamp, "w", encoding="utf-8") as f:
        f.write(made_from)
    return summary


def _train(ref: RecipeRef, cfg: QuickstartConfig, extra: list[str], job_class=None) -> dict:
    from components.config import load as load_cfg
    from ray_jobs.train_common import fit
    from ray_jobs.train_vlm import VLMJobConfig

    job_class = job_class or VLMJobConfig
    job = load_cfg(job_class, ref.recipe, [f"data.path={cfg.preprocess.output}", f"run.storage_path={cfg.runs}",
                                          *ref.overrides, *extra])
    return fit(job, f"{job_class.__module__}.{job_class.__qualname__}")


def _pretrain(ref: RecipeRef, cfg: QuickstartConfig) -> dict:
    from ray_jobs.pretrain_contrastive import ContrastiveJobConfig

    return _train(ref, cfg, [], ContrastiveJobConfig)


def _tokenizer(cfg: QuickstartConfig) -> dict:
    from ray_jobs.train_tokenizer import TokenizerJobConfig
    from ray_jobs.train_tokenizer import run as train_tokenizer

    job = load(TokenizerJobConfig, cfg.tokenizer.recipe,
               [f"data_path={cfg.preprocess.output}", *cfg.tokenizer.overrides])
    return train_tokenizer(job)


def _train_twin(cfg: QuickstartConfig, suffix: str, extra: list[str], step, say) -> dict:
    """align -> finetune under run names ending in ``suffix``."""
    out = {}
    if cfg.align is not None:
        say(step(), f"align{suffix}: train the perceiver (encoders and LLM frozen)")
        out["align"] = _train(cfg.align, cfg, [f"run.name=align{suffix}", *extra])
    if cfg.finetune is not None:
        say(step(), f"finetune{suffix}: all parts, from the align checkpoint")
        init = [f"run.init_from={out['align']['checkpoint']}"] if "align" in out else []
        out["finetune"] = _train(cfg.finetune, cfg, [f"run.name=finetune{suffix}", *init, *extra])
    return out


def _evaluate(cfg: QuickstartConfig, model: str, images: str, name: str, extra: list[str]) -> dict:
    from ray_jobs.evaluate import EvaluateConfig
    from ray_jobs.evaluate import run as evaluate

    ecfg = load(EvaluateConfig, cfg.evaluate.recipe,
                [f"model={model}", f"data_path={cfg.preprocess.output}", f"images={images}", f"run={name}",
                 f"output={os.path.join(cfg.results, name)}", *cfg.evaluate.overrides, *extra])
    return evaluate(ecfg)


def prove(cfg: QuickstartConfig, trained: dict, blind: dict) -> dict:
    """The learning proof from the two evaluations; writes proof.json and the slice-attention heatmap."""
    import pyarrow.parquet as pq

    from components.data.phantom import lesion_slices, read_findings
    from components.metrics.learning_proof import learning_proof, lesion_attention, lesion_rows
    from components.metrics.results import load_results
    from components.metrics.slice_attention import plot_slice_attention

    results = load_results([trained["results"], blind["results"]])
    rows = pq.read_table(trained["predictions"]).to_pylist()
    spec = json.load(open(os.path.join(cfg.preprocess.output, "summary.json"), encoding="utf-8"))["spec"]
    findings = read_findings(cfg.phantom.output)
    masks = {}
    for r in rows:
        case = findings.get(os.path.basename(r["volume_id"]).split(".")[0])
        masks[r["volume_id"]] = lesion_slices(case, spec) if case else None
    scores, lesion_masks, types = lesion_rows(rows, masks)
    attention = lesion_attention(scores, lesion_masks, types) if scores else None
    proof = learning_proof(results[0], results[1], attention)
    if scores:
        n = min(len(scores), 40)
        proof["heatmap"] = plot_slice_attention(
            scores[:n], lesion_masks[:n], [f"{t} question" for t in types[:n]],
            "TG-IS slice weights on test questions about a lesion", os.path.join(cfg.results, "slice_attention.png"))
    with open(os.path.join(cfg.results, "proof.json"), "w", encoding="utf-8") as f:
        json.dump(proof, f, indent=1, default=float)
    return proof


def _tables(cfg: QuickstartConfig, evals: list[dict]) -> str:
    from components.metrics.results import load_results
    from components.metrics.tables import write_tables

    folder = os.path.join(cfg.results, "tables")
    write_tables(load_results([e["results"] for e in evals]), folder)
    return folder


def run(cfg: QuickstartConfig) -> dict:
    t0 = time.time()
    trains = (cfg.align is not None) + (cfg.finetune is not None)
    optional = (cfg.tokenizer, cfg.pretrain, cfg.pretrain_2d)
    n = 2 + sum(x is not None for x in optional) + (trains + (cfg.evaluate is not None)) * (2 if cfg.blind else 1)
    counter = iter(range(1, n + 1))

    def say(i, text):
        print(f"\n== {i}/{n} [{time.time() - t0:.0f} s] {text}", flush=True)

    say(next(counter), "make the phantom CT dataset")
    phantom = make_phantom(cfg.phantom)
    say(next(counter), "preprocess it with Ray Data")
    summary = _preprocess_once(cfg, phantom)
    for folder in (cfg.runs, cfg.results):  # every quickstart trains and evaluates afresh
        shutil.rmtree(folder, ignore_errors=True)
    pretrained, shared = {}, []
    if cfg.tokenizer is not None:
        say(next(counter), "refit the LLM's tokenizer to the training text")
        shared.append(f"model.llm.tokenizer={_tokenizer(cfg)['output']}")
    if cfg.pretrain is not None:
        say(next(counter), "pretrain the 3D encoder against the reports (contrastive)")
        pretrained = {"pretrain": _pretrain(cfg.pretrain, cfg)}
        # a pretraining checkpoint names its encoder export (see EncoderSpec.checkpoint)
        shared.append(f"model.encoder_3d.checkpoint={pretrained['pretrain']['checkpoint']}")
    if cfg.pretrain_2d is not None:
        say(next(counter), "pretrain the per-slice 2D encoder against the reports (contrastive)")
        pretrained["pretrain_2d"] = _pretrain(cfg.pretrain_2d, cfg)
        shared.append(f"model.encoder_2d.checkpoint={pretrained['pretrain_2d']['checkpoint']}")
    trained = _train_twin(cfg, "", shared, lambda: next(counter), say)
    twin = _train_twin(cfg, "-blind", ["data.images=zeros", *shared], lambda: next(counter), say) if cfg.blind else {}
    evals = {}
    if cfg.evaluate is not None and "finetune" in trained:
        say(next(counter), "evaluate the model on the test split through Ray Serve")
        retrieval = [f"retrieval.model={pretrained['pretrain']['checkpoint']}"] if "pretrain" in pretrained else []
        evals["trained"] = _evaluate(cfg, trained["finetune"]["checkpoint"], "real", "trained", retrieval)
        if twin:
            say(next(counter), "evaluate the blind twin (zeros for images) through Ray Serve")
            evals["blind"] = _evaluate(cfg, twin["finetune"]["checkpoint"], "zeros", "blind",
                                       ["tasks=[caption,vqa_closed]"])
    os.makedirs(cfg.results, exist_ok=True)
    tables = _tables(cfg, list(evals.values())) if evals else None
    proof = prove(cfg, evals["trained"], evals["blind"]) if "blind" in evals else None
    report(cfg, summary, {**pretrained, **trained}, twin, evals, tables, proof, time.time() - t0)
    return {"preprocess": summary, **pretrained, **trained, **{f"{k}-blind": v for k, v in twin.items()},
            "evaluations": evals, "tables": tables, "proof": proof}


def report(cfg, summary, trained, twin, evals, tables, proof, seconds) -> None:
    v, s = summary["volumes"], summary["samples"]
    print("\n== quickstart summary")
    print(f"dataset     {cfg.phantom.output} ({cfg.phantom.phantom.n_volumes} CT volumes with reports and VQA)")
    print(f"shards      {cfg.preprocess.output}/volumes (spec {summary['spec']['name']}, "
          f"shape (1, {', '.join(map(str, summary['spec']['size']))}))")
    print(f"volumes     in {v['in']} = out {v['out']} + quarantined {v['quarantined']}")
    print(f"samples     {s['out']} kept, {s['quarantined']} quarantined (see quarantine.csv)")
    for name, t in [*trained.items(), *((f"{k}-blind", x) for k, x in twin.items())]:
        final = (t["final"] or {}).get("loss")
        print(f"{name:15s} loss {t['first_loss']:.3f} -> {final:.3f} over {t['steps']} steps; "
              f"checkpoint {t['checkpoint']}")
        print(f"{'':15s} loss curve {t['loss_curve']}")
    if tables:
        print("\n== tables (test split; 'trained' = the model, 'blind' = its twin shown zeros)\n")
        print(open(os.path.join(tables, "tables.md"), encoding="utf-8").read())
        print(f"tables and charts  {tables} (Markdown, CSV, PNG; per-type accuracy: "
              f"{os.path.join(tables, 'vqa_closed_per_type__' + os.path.basename(cfg.preprocess.output) + '.png')})")
        for name, e in evals.items():
            print(f"predictions ({name:7s}) {e['predictions']}")
    if proof:
        print("\n== learning proof")
        for c in proof["conditions"]:
            figures = ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}"
                                for k, x in c["figures"].items() if not isinstance(x, dict))
            print(f"[{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {figures}")
        if proof.get("heatmap"):
            print(f"slice-attention heatmap {proof['heatmap']}")
        print("proved: the image informs the answers" if proof["passed"]
              else "NOT proved: see the failed conditions above" +
              ("" if cfg.require_proof else " (exit status 0: every stage ran; require_proof=true fails on it)"))
        print(f"proof       {os.path.join(cfg.results, 'proof.json')}")
    print(f"time        {seconds:.0f} s")


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
    raise SystemExit(exit_status(cfg, run(cfg)["proof"]))


def exit_status(cfg: QuickstartConfig, proof: dict | None) -> int:
    """0 once every stage has run; 1 for a failed learning proof only when the config requires it."""
    return int(cfg.require_proof and proof is not None and not proof["passed"])


if __name__ == "__main__":
    main()
