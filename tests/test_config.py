import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from components.config import ConfigError, apply_overrides, from_dict, load, to_dict


@dataclass
class Optim:
    """doc"""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Train:
    steps: int
    optimizer: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    resume: bool = False
    note: str | None = None


def test_nested_types_and_defaults():
    cfg = from_dict(Train, {"steps": 3, "optimizer": {"lr": "3e-5", "betas": [0.8, 0.9]}, "tags": ["a"]})
    assert cfg.optimizer.lr == pytest.approx(3e-5) and cfg.optimizer.betas == (0.8, 0.9)
    assert to_dict(cfg)["optimizer"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("data, where", [
    ({"steps": 1, "optimizer": {"lr": "fast"}}, "optimizer.lr"),
    ({"steps": 1, "optimizer": {"lrr": 1.0}}, "optimizer.lrr"),
    ({"steps": "1"}, "steps"),
    ({"steps": 1, "resume": "false"}, "resume"),
    ({"steps": 1, "optimizer": {"name": "adam"}}, "optimizer.name"),
    ({"steps": 1, "tags": ["a", 2]}, "tags[1]"),
    ({"steps": 1, "optimizer": {"betas": [0.9]}}, "optimizer.betas"),
    ({}, "steps"),
])
def test_bad_values_name_the_field(data, where):
    with pytest.raises(ConfigError) as e:
        from_dict(Train, data)
    assert str(e.value).startswith(where + ":") or f" {where}:" in str(e.value) or str(e.value).startswith(where)


def test_overrides_from_the_command_line(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 2\noptimizer:\n  lr: 0.1\n", encoding="utf-8")
    cfg = load(Train, p, ["optimizer.lr=0.5", "tags=[x, y]", "resume=true", "note=null"])
    assert cfg.optimizer.lr == 0.5 and cfg.tags == ["x", "y"] and cfg.resume is True and cfg.note is None
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load(Train, p, ["optimizer.lr=abc"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["nonsense"])


def test_bad_yaml_and_missing_file(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Train, p)
    with pytest.raises(ConfigError, match="not found"):
        load(Train, tmp_path / "nope.yaml")


def test_preprocess_config_names_bad_spec_fields():
    from ray_jobs.preprocess import PreprocessConfig

    for override, where in [("spec_overrides.size=[1, 2]", "spec_overrides.size"),
                            ("spec_overrides.orientation=LPS", "spec_overrides.orientation"),
                            ("spec=e4d", "spec:"), ("volumes_per_task=0", "volumes_per_task"),
                            ("compression=brotli", "compression")]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load(PreprocessConfig, Path("ray_jobs/configs/preprocess/quickstart.yaml"), [override])


def test_quickstart_checks_every_stage_recipe_at_load():
    from ray_jobs.quickstart import QuickstartConfig

    # a bad override of a late stage fails before the phantom is made, naming the stage and the field
    for override, where in [('finetune.overrides=["optim.lr=fast"]', "finetune: .*optim.lr"),
                            ('evaluate.overrides=["tasks=[vqa_sideways]"]', r"evaluate: .*tasks\[0\]"),
                            ("align.recipe=nope.yaml", "align: config file not found")]:
        with pytest.raises(ConfigError, match=where):
            load(QuickstartConfig, Path("ray_jobs/configs/quickstart.yaml"), [override])


SHIPPED = sorted(Path(__file__).resolve().parents[1].glob("ray_jobs/configs/**/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_shipped_config_loads(path):
    from ray_jobs.registry import config_class_for

    cfg = load(config_class_for(path), path)
    assert cfg is not None


def test_a_local_ray_lists_parquet_with_one_footer_reader_per_cpu(monkeypatch):
    from ray_jobs.common import size_ray_data_for_local

    key = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
    for cpus, expected in ((2, "2"), (64, "32")):
        monkeypatch.delenv(key, raising=False)
        size_ray_data_for_local(cpus)
        assert os.environ[key] == expected
    monkeypatch.setenv(key, "5")  # the user's own setting stays
    size_ray_data_for_local(2)
    assert os.environ[key] == "5"


def test_a_local_ray_answers_ray_trains_state_queries():
    """Ray Train's placement-group cleaner asks the state API once a second whether a run's controller
    is alive; a local Ray without it would print a warning each time for the whole run."""
    import subprocess
    import sys

    probe = ("from ray_jobs.common import RayConfig, init_ray\n"
             "init_ray(RayConfig(num_cpus=1))\n"
             "from ray.util.state import list_nodes\n"
             "print('nodes', len(list_nodes()))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, env=env, timeout=180)
    assert done.returncode == 0 and "nodes 1" in done.stdout, done.stderr[-2000:]
