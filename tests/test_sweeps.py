"""Ray Tune sweeps on a local Ray (no mocks): every shipped CPU sweep runs and renders its table (ASHA
stopping rows of one), an interrupted sweep resumes without rerunning finished trials, a trial with
two workers runs a TorchTrainer, ASHA's rungs outlive the driver; every sweep YAML loads and a bad one
fails naming the field."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from components.config import ConfigError, from_dict, load
from components.models.builders import build_perceiver
from components.models.config import PerceiverSpec
from ray_jobs.train_vlm import VLMJobConfig
from tune.config import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = ["e3d_perceivers", "med2e3_encoders", "med2e3_aggregation", "med2e3_scoring", "med3dvlm_projectors",
          "lr_lora_rank"]
PNG = b"\x89PNG\r\n\x1a\n"


def _cpu_sweep(name, shards, tmp_path, *overrides):
    return load_sweep(os.path.join(ROOT, "tune/cpu", f"{name}.yaml"), [
        f"data_path={shards}", f"storage_path={tmp_path / 'sweeps'}", f"output_dir={tmp_path / 'out' / name}",
        *overrides])


def _rows(csv_path):
    with open(csv_path, encoding="utf-8") as f:
        return list(csv.reader(f))


def test_every_shipped_sweep_yaml_loads_and_its_cpu_variant_has_the_same_rows_and_columns():
    for name in SWEEPS:
        full, full_recipes = load_sweep(os.path.join(ROOT, "tune", f"{name}.yaml"))
        cpu, cpu_recipes = load_sweep(os.path.join(ROOT, "tune/cpu", f"{name}.yaml"))
        assert [v.name for v in full.variants] == list(full_recipes) and len(full_recipes) >= 2, name
        assert [v.name for v in cpu.variants] == list(cpu_recipes), name
        if name != "lr_lora_rank":  # the CPU variant samples fewer ranks and rates
            assert list(full_recipes) == list(cpu_recipes), name
        assert [c.key for c in full.table.columns] == [c.key for c in cpu.table.columns], name
        assert full.storage_path.startswith("s3://") and all(r["scaling"]["use_gpu"] for r in full_recipes.values())
        assert all(r["scaling"]["num_workers"] == 1 for r in cpu_recipes.values())
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "tune", "*.yaml"))) == sorted(SWEEPS)
    # the rows really differ where the paper's table says they do
    _, recipes = load_sweep(os.path.join(ROOT, "tune/e3d_perceivers.yaml"))
    assert [r["model"]["perceiver"]["name"] for r in recipes.values()] == [
        "qformer_global", "qformer_local", "mlp_mixer", "avg_pool", "max_pool", "conv3d"]
    # E3D-GPT's ablation holds the token count: 14^3 = 2744 encoder tokens -> 343 image tokens in every row
    for recipe in recipes.values():
        perceiver = build_perceiver(from_dict(PerceiverSpec, recipe["model"]["perceiver"]), 32, in_dim=1536,
                                    grid=(14, 14, 14))
        assert perceiver.num_tokens == 343, recipe["model"]["perceiver"]
    # Med3DVLM's projectors on DCFormer-small's last two stages (256 x 384, 32 x 768)
    _, recipes = load_sweep(os.path.join(ROOT, "tune/med3dvlm_projectors.yaml"))
    stages = [(384, (4, 8, 8)), (768, (2, 4, 4))]
    tokens = {name: build_perceiver(from_dict(PerceiverSpec, r["model"]["perceiver"]), 64, in_dim=768,
                                    grid=(2, 4, 4), stages=stages).num_tokens for name, r in recipes.items()}
    assert tokens == {"2xMLP": 32, "2xMLP-H": 288, "1xMLP-Mixer-H": 256, "2xMLP-Mixer-H": 256}
    _, recipes = load_sweep(os.path.join(ROOT, "tune/med2e3_scoring.yaml"))
    assert [r["model"]["fusion"]["scoring_inputs"] for r in recipes.values()] == [
        ["3d"], ["2d"], ["3d", "2d"], ["text", "3d"], ["text", "2d"], ["text", "3d", "2d"]]
    _, recipes = load_sweep(os.path.join(ROOT, "tune/med2e3_encoders.yaml"))
    assert recipes["3D Only"]["model"]["encoder_2d"] is None and recipes["2D Only"]["model"]["fusion"]["output"] == "2d"


def test_search_space_is_tunes_grid_and_samplers_and_a_trial_config_becomes_overrides():
    from ray import tune

    from tune.sweep import param_space
    from tune.trial import trial_row

    cfg, recipes = load_sweep(os.path.join(ROOT, "tune/cpu/lr_lora_rank.yaml"), [
        "search=[{key: optim.weight_decay, sampler: uniform, low: 0.0, high: 0.1}, "
        "{key: data.batch_size, sampler: choice, values: [2, 4]}]", "num_samples=3"])
    space = param_space(cfg)
    assert space["variant"] == tune.grid_search(["r=4", "r=16"])
    assert space["grid"]["0"] == tune.grid_search([1e-2, 1e-7])
    wd, bs = space["search"]["0"], space["search"]["1"]
    assert (wd.lower, wd.upper) == (0.0, 0.1) and bs.categories == [2, 4]
    config = {"variant": "r=16", "grid": {"0": 1e-7}, "search": {"0": wd.sample(), "1": bs.sample()}}
    variant, values, overrides = trial_row(cfg, config)
    recipe = load(VLMJobConfig, data=recipes[variant], overrides=overrides)
    assert recipe.model.tune.lora.r == 16 and recipe.optim.lr == 1e-7 and values[0] == 1e-7
    assert recipe.optim.weight_decay == config["search"]["0"] and recipe.data.batch_size in (2, 4)


def test_bad_sweep_configs_fail_at_load_naming_the_field(tmp_path):
    path = os.path.join(ROOT, "tune/cpu/e3d_perceivers.yaml")
    with pytest.raises(ConfigError, match=r"scheduler\.nmae: unknown key"):
        load_sweep(path, ["scheduler.nmae=asha"])
    with pytest.raises(ConfigError, match=r"num_samples: expected int"):
        load_sweep(path, ["num_samples=many"])
    with pytest.raises(ConfigError, match=r"scheduler\.name: expected one of 'none', 'asha'"):
        load_sweep(path, ["scheduler.name=hyperband"])
    with pytest.raises(ConfigError, match=r"variants \(Bad\): .*model\.perceiver\.nmae: unknown key"):
        load_sweep(path, ["variants=[{name: Bad, overrides: [model.perceiver.nmae=conv3d]}]"])
    with pytest.raises(ConfigError, match=r"variants \(Bad\): .*optim\.lr: expected float"):
        load_sweep(path, ["variants=[{name: Bad, overrides: [optim.lr=fast]}]"])
    with pytest.raises(ConfigError, match=r"search\[0\]: low/high"):
        load_sweep(path, ["search=[{key: optim.lr, sampler: loguniform, low: 0.1, high: 0.01}]"])
    with pytest.raises(ConfigError, match=r"recipe: .*optim\.lrr: unknown key"):
        load_sweep(path, ["variants=[]", "search=[{key: optim.lrr, sampler: uniform, low: 0.1, high: 0.2}]"])
    with pytest.raises(ConfigError, match=r"variants: names must be unique"):
        load_sweep(path, ["variants=[{name: A}, {name: A}]"])
    with pytest.raises(ConfigError, match=r"run\.init_from: a row that changes the model"):
        load_sweep(path, [f"recipe_overrides=[run.init_from={tmp_path}]"])


def _cli(name, shards, tmp_path, *overrides):
    """``python -m tune.sweep`` for a CPU sweep, as a driver of its own on the tests' Ray."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": ROOT,
           "PYTHONUNBUFFERED": "1"}  # the interrupted-sweep test watches the log for a finished trial
    cmd = [sys.executable, "-m", "tune.sweep", "--config", os.path.join(ROOT, "tune/cpu", f"{name}.yaml"),
           f"data_path={shards}", f"storage_path={tmp_path / 'sweeps'}", f"output_dir={tmp_path / 'out' / name}",
           *overrides]
    log = open(tmp_path / f"{name}.log", "w", encoding="utf-8")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_every_cpu_sweep_runs_and_renders_its_table(train_shards, tmp_path, ray_local):
    # all six drivers at once: their trials queue for the two CPUs, so one sweep's trial-process
    # start overlaps another's trials instead of leaving a core idle
    kept_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "radray-trial-*")))
    procs = {name: _cli(name, train_shards, tmp_path) for name in SWEEPS}
    for name, proc in procs.items():
        assert proc.wait(600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    # finished, failed and early-stopped trials alike remove the model copy they kept for evaluation
    assert not set(glob.glob(os.path.join(tempfile.gettempdir(), "radray-trial-*"))) - kept_before
    for name in SWEEPS:
        cfg, _ = _cpu_sweep(name, train_shards, tmp_path)
        printed = dict(line.split("] ", 1)[1].split(": ", 1) for line in (tmp_path / f"{name}.log").read_text(
            encoding="utf-8").splitlines() if line.startswith("[sweep] ") and ": " in line.split("] ", 1)[1])
        paths = {k: v for k, v in printed.items() if k in ("markdown", "csv", "chart", "best_recipe", "eval_tables")}
        assert set(paths) == {"markdown", "csv", "chart", "best_recipe", "eval_tables"}, printed
        assert all(os.path.exists(p) for p in paths.values()), paths
        expected = len(cfg.variants) * (len(cfg.grid[0].values) if cfg.grid else 1)
        header, *rows = _rows(paths["csv"])
        # rows = the paper's rows (x grid values), in the config's order; columns = the table's metrics
        assert len(rows) == expected and rows[0][0] == cfg.variants[0].name, (name, rows)
        assert [c.label for c in cfg.table.columns] == header[len(header) - len(cfg.table.columns) - 2:-2], header
        first = header.index(cfg.table.columns[0].label)
        done = [r for r in rows if r[-1] == "done"]
        assert done and all(cell != "-" for r in done for cell in r[first:first + len(cfg.table.columns)]), rows
        assert all(float(r[-2]) > 0 for r in done)  # the validation loss of every finished row
        assert not [r for r in rows if r[-1].startswith("error")], rows
        with open(paths["markdown"], encoding="utf-8") as f:
            markdown = f.read()
        assert cfg.table.title in markdown and all(v.name in markdown for v in cfg.variants)
        with open(paths["chart"], "rb") as f:
            assert f.read(8) == PNG
        best = load(VLMJobConfig, paths["best_recipe"])
        assert best.run.name == f"{cfg.name}-best" and best.model is not None
        with open(printed["rows"], encoding="utf-8") as f:  # every finished row was scored on 2 samples per task
            scored = [r["metrics"] for r in json.load(f) if r["status"] == "done"]
        assert all(m[f"{task}/n_samples"] == 2 for m in scored for task in cfg.evaluation.tasks), scored
    # ASHA (lr_lora_rank) stopped the near-zero learning rates at its first rung; the first row finished
    statuses = [r[-1] for r in _rows(os.path.join(tmp_path, "out", "lr_lora_rank", "lr_lora_rank_cpu.csv"))[1:]]
    assert statuses[0] == "done" and "stopped early at step 2" in statuses, statuses
    assert os.path.exists(tmp_path / "sweeps" / "lr_lora_rank_cpu" / "asha_state.pkl")  # its rungs, for a resume
    # Med-2E3 Table 5 keeps its tick columns; Med3DVLM's per-type tables come from the evaluation results
    header = _rows(os.path.join(tmp_path, "out", "med2e3_scoring", "med2e3_scoring_cpu.csv"))[0]
    assert header[:4] == ["Scoring", "Text", "3D", "2D"]
    per_type = glob.glob(os.path.join(tmp_path, "out", "med3dvlm_projectors", "eval_tables", "vqa_closed_per_type__*.csv"))
    assert per_type and {r[0] for r in _rows(per_type[0])[1:]} == {"2xMLP", "2xMLP-H", "1xMLP-Mixer-H", "2xMLP-Mixer-H"}


def _trial_lines(fs, exp_dir):
    """Every trial's reported results, from the experiment folder in storage."""
    out = {}
    fs.invalidate_cache()  # the resumed sweep rewrites result files this listing may have cached
    for path in fs.glob(f"{exp_dir}/trial_*/result.json"):
        with fs.open(path, "r", encoding="utf-8") as f:
            out[path.rsplit("/", 2)[-2]] = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    return out


def test_an_interrupted_sweep_in_object_storage_resumes_without_rerunning_finished_trials(
        train_shards, tmp_path, ray_local, s3_server):
    import s3fs

    from tune.sweep import run_sweep

    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], endpoint_url=s3_server["endpoint_url"])
    fs.mkdir("sweeps")
    overrides = ["max_concurrent_trials=1", "variants=[{name: AvgPooling, overrides: [model.perceiver.name=avg_pool]}, "
                 "{name: MaxPooling, overrides: [model.perceiver.name=max_pool]}, {name: Convolution}]",
                 "storage_path=s3://sweeps/runs", f"storage={json.dumps(s3_server)}"]
    proc = _cli("e3d_perceivers", train_shards, tmp_path, *overrides)
    log = tmp_path / "e3d_perceivers.log"
    try:  # the driver gets Ctrl+C as soon as the first trial has finished (evaluation included)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and "completed after" not in log.read_text("utf-8"):
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted: " + log.read_text("utf-8")[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    cfg, recipes = _cpu_sweep("e3d_perceivers", train_shards, tmp_path, *overrides)
    exp = f"sweeps/runs/{cfg.name}"
    before = _trial_lines(fs, exp)
    finished = [t for t, lines in before.items() if lines and "eval_result" in lines[-1]]
    assert len(finished) == 1 and len(before) < 3, {t: len(v) for t, v in before.items()}

    out = run_sweep(cfg, recipes)
    assert out["resumed"] and out["experiment"] == exp
    after = _trial_lines(fs, exp)
    assert after[finished[0]] == before[finished[0]]  # the finished trial was not run again
    assert len(after) == 3 and len(out["grid"]) == 3 and out["grid"].num_errors == 0
    rows = _rows(out["paths"]["csv"])[1:]
    assert [r[0] for r in rows] == ["AvgPooling", "MaxPooling", "Convolution"] and all(r[-1] == "done" for r in rows)
    assert fs.glob(f"{exp}/trial_*/checkpoint_*/model/config.yaml")  # checkpoints went through Tune to S3


def test_a_trial_with_two_workers_runs_a_torch_trainer_with_a_validation_shard(train_shards, tmp_path, ray_local):
    from tune.sweep import run_sweep

    cfg, recipes = _cpu_sweep(
        "e3d_perceivers", train_shards, tmp_path, "variants=[{name: Convolution}]",
        # the trial's own process only drives the trainer: the CPUs go to its two workers and to Ray
        # Data, whose file listing needs one whole free CPU
        "resources_per_trial={CPU: 0.01}",
        "recipe_overrides=[scaling.num_workers=2, scaling.cpus_per_worker=0.45, run.max_steps=2, run.val_every_n_steps=2]",
        "evaluation.enabled=false",  # the evaluation is the in-process trials' code, tested above
        "search=[{key: optim.lr, sampler: loguniform, low: 1.0e-4, high: 1.0e-3, label: lr}]")  # a random search
    out = run_sweep(cfg, recipes)
    (result,) = out["grid"]
    assert result.error is None and result.metrics["step"] == 2 and result.metrics["completed"]
    assert result.metrics["val_loss"] > 0
    runs = glob.glob(os.path.join(tmp_path, "sweeps", cfg.name, "train_runs", f"{cfg.name}-*", "checkpoint_*"))
    assert runs, "the trial's TorchTrainer wrote no checkpoint"
    with open(os.path.join(os.path.dirname(runs[0]), "metrics.jsonl"), encoding="utf-8") as f:
        assert "val_loss" in [json.loads(line) for line in f][-1]
    header, row = _rows(out["paths"]["csv"])
    assert header[:2] == ["Perceiver", "lr"] and row[0] == "Convolution" and row[-1] == "done"
    assert float(row[-2]) == pytest.approx(result.metrics["val_loss"], abs=1e-4)
    best = load(VLMJobConfig, out["paths"]["best_recipe"])  # chosen by validation loss without evaluation
    lr = result.config["search"]["0"]
    assert best.scaling.num_workers == 2 and 1e-4 <= lr <= 1e-3 and best.optim.lr == lr
    assert float(row[1]) == pytest.approx(lr, rel=1e-2)


def test_asha_rungs_saved_in_object_storage_come_back_for_a_restored_sweep(s3_server):
    """Tune restores a sweep's scheduler as it was pickled at the start, with empty rungs; ours reads
    the rungs it saved. A trial behind the one recorded before the interruption is stopped at the
    rung, as it would have been without one; with nothing saved the same result passes."""
    import s3fs
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune.asha import ResumableASHA

    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], endpoint_url=s3_server["endpoint_url"])
    fs.mkdir("asha")
    uri = "s3://asha/sweep/asha_state.pkl"

    def asha():  # what Tuner.restore unpickles: a scheduler that has seen nothing
        return ResumableASHA(uri, s3_server, time_attr="step", metric="val_loss", mode="min", max_t=4,
                             grace_period=2, reduction_factor=2)

    first, finished = asha(), Trial("row", stub=True)
    first.on_trial_add(None, finished)
    assert first.on_trial_result(None, finished, {"step": 2, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    first.on_trial_complete(None, finished, {"step": 4, "val_loss": 0.5})
    assert fs.exists("asha/sweep/asha_state.pkl") and first.recorded() == 2

    restored, behind = asha(), Trial("row", stub=True)
    restored.on_trial_add(None, behind)
    assert restored.recorded() == 2
    assert restored.on_trial_result(None, behind, {"step": 2, "val_loss": 3.0}) == TrialScheduler.STOP

    asha().forget()  # a sweep started afresh under the same name
    fresh, other = asha(), Trial("row", stub=True)
    fresh.on_trial_add(None, other)
    assert fresh.recorded() == 0
    assert fresh.on_trial_result(None, other, {"step": 2, "val_loss": 3.0}) == TrialScheduler.CONTINUE
