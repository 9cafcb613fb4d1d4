"""The repository keeps its promises: two set-up commands, CI runs the README's, no shadowing packages."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    main, tests = cmds
    assert main.startswith("pip install torch==2.13.0") and tests.startswith("pip install torch==2.13.0")
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci
    ci_cmds = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")
               and not line.startswith(("set ", "cd "))]
    assert ci_cmds == [tests]


def test_datasets_is_yaml_only():
    assert not (ROOT / "datasets" / "__init__.py").exists()
    assert {p.suffix for p in (ROOT / "datasets").iterdir()} == {".yaml"}


def test_model_code_does_not_import_ray():
    for p in (ROOT / "components" / "models").rglob("*.py"):
        assert not re.search(r"^\s*(import ray|from ray)", p.read_text(encoding="utf-8"), re.M), p
