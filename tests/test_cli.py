"""The ``radray`` command: one verb per job, each running the job's own ``main``."""
from __future__ import annotations

import importlib
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ray_jobs import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_verb_runs_a_job_main():
    for verb, (module, what) in cli.VERBS.items():
        assert callable(importlib.import_module(module).main), verb
        assert what


def test_the_console_script_is_installed_and_lists_every_verb():
    (script,) = entry_points(group="console_scripts", name="radray")
    assert script.value == "ray_jobs.cli:main"
    exe = shutil.which("radray")
    assert exe, "the radray script is not on PATH: reinstall with pip install -e ."
    run = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    for verb in cli.VERBS:
        assert f"  {verb} " in run.stdout


def test_a_verb_runs_its_job(capsys):
    rc = cli.main(["summary", "--config", str(ROOT / "components/models/presets/tiny.yaml"),
                   "encoder_3d.overrides.depth=1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "GFLOPs" in out and "8 image tokens" in out


def test_a_verbs_help_and_errors_name_the_verb(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: radray train")
    with pytest.raises(SystemExit) as e:
        cli.main(["preprocess", "--config", str(ROOT / "ray_jobs/configs/preprocess/quickstart.yaml"),
                  "spec_name=e3d"])
    assert e.value.code == 2
    assert "spec_name" in capsys.readouterr().err


def test_an_unknown_verb_suggests_the_closest_one(capsys):
    assert cli.main(["preprocss"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'preprocess'" in err and "verbs:" in err
    assert cli.main([]) == 2
    assert "usage: radray" in capsys.readouterr().out
