"""The house rules: stages import only downwards (import-linter), and 0.1.0's names still import."""

import re
import subprocess
import sys
import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("old, name", [
    ("prune.models", "load_model"), ("prune.recipe", "load_recipe"), ("prune.recipe", "HealConfig"),
    ("prune.scoring", "score"), ("prune.select", "Selection"), ("prune.checkpoint", "Checkpoint"),
    ("prune.evaluate", "perplexity"), ("prune.hub", "push"), ("prune.execution", "plan_execution"),
    ("prune.execution", "check_sequential_recipe"), ("prune.check", "byte_ranges"),
])
def test_old_module_names_import_with_a_deprecation_warning(old, name):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    assert callable(getattr(module, name)) or isinstance(getattr(module, name), type)


def test_the_version_is_the_packages():
    """``prune --version``, the records and push's commit message say the version pyproject.toml installs (after
    the redesign 0.2.0: the old names are 0.1.0's)."""
    import re

    from prune import __version__

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert __version__ == declared and declared != "0.1.0"


def test_every_old_module_name_points_at_modules_that_exist():
    """prune.hub named a module prune.io.hub that never existed: any name it lacked raised ModuleNotFoundError
    (hasattr raised too) instead of AttributeError."""
    import importlib

    from prune._compat import MOVED

    for old, targets in MOVED.items():
        for target in targets:
            importlib.import_module(f"prune.{target}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hub = importlib.import_module("prune.hub")
    assert not hasattr(hub, "no_such_name")


def test_the_deprecation_warning_is_shown_to_a_script_under_default_filters(tmp_path):
    """It pointed into the import system (sys:1), where Python's default filters hide a DeprecationWarning:
    no script or notebook ever saw it. It points at the line that imports now."""
    import subprocess

    script = tmp_path / "old.py"
    script.write_text("import prune.models\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and f"{script}:1: DeprecationWarning: prune.models is deprecated" in res.stderr


def test_importing_an_old_module_keeps_the_function_of_the_same_name_working():
    import importlib

    import prune

    sys.modules.pop("prune.select", None)
    importlib.import_module("prune.select")  # sets the attribute prune.select to the old module's alias
    from conftest import build_model  # noqa: F401  (fixtures' helpers)

    class Scores:  # the least a score-only rule reads
        n_layers = 6
        block_influence = [0.9, 0.1, 0.2, 0.3, 0.4, 0.9]

    assert prune.select(Scores(), 2, metric="bi").removed == [1, 2]


def test_0_1_0_packages_keep_their_names():
    from prune.export import save
    from prune.heal import heal_model
    from prune.pipeline import evaluate_model, run, score_model

    import prune

    assert prune.run is run and prune.save is save and prune.heal_model is heal_model
    assert callable(evaluate_model) and callable(score_model)


def test_every_repository_path_the_docs_name_exists():
    """README, docs/*.md, the recipes' comments, docstrings and scripts point readers at files
    (``prune/core/metrics.py``, ``scripts/bench_heal.py``): a file moved or renamed leaves them pointing nowhere."""
    named = re.compile(r"\b(?:prune|scripts|tests|recipes|docs)/[\w./-]*\.(?:py|sh|yaml|md|png)\b")
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "recipes").glob("*.yaml"),
            *(ROOT / "prune").rglob("*.py"), *(ROOT / "scripts").glob("*.*"), ROOT / ".ci" / "run"]
    found = {(doc, path) for doc in docs for path in named.findall(doc.read_text())}
    missing = sorted(f"{doc.relative_to(ROOT)}: {path}" for doc, path in found
                     if not (ROOT / path).exists() and not (doc.parent / path).exists())
    assert len(found) > 100 and not missing, missing  # (the pattern finds the paths at all: 200 today)
