"""Packaging: one version source, the Apache-2.0 license declared and shipped, and a wheel
that installs the shipped models where `resolve_checkpoint` finds them."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import llada

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "config.json").is_file())


def test_the_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "llada.__version__"}
    assert importlib.metadata.version("llada-kit") == llada.__version__


def test_the_license_is_apache_2_0_declared_and_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "9. Accepting Warranty or Additional Liability."):
        assert section in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert importlib.metadata.metadata("llada-kit")["License-Expression"] == "Apache-2.0"


def test_the_lm_eval_plugin_is_declared():
    entry_points = PYPROJECT["project"]["entry-points"]["lm_eval.models"]
    assert entry_points == {"llada": "llada.eval.lm_eval:LLaDAEvalLM"}


def test_llada_models_lists_the_shipped_models_and_prints_one_folder(capsys):
    from llada.cli.main import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    for name, line in zip(SHIPPED, lines, strict=True):
        assert str(ROOT / "models" / name) in line
        assert line.endswith("(default)") == (name == "llada-tiny-instruct")
    assert main(["models", "llada-tiny-base"]) == 0
    assert capsys.readouterr().out.strip() == str(ROOT / "models" / "llada-tiny-base")
    assert main(["models", "llada-huge"]) == 2
    error = capsys.readouterr().err
    assert f"no shipped model 'llada-huge'; shipped: {', '.join(SHIPPED)}" in error


def test_llada_models_without_any_says_how_to_get_them(tmp_path, monkeypatch, capsys):
    from llada.cli.main import main
    from llada.model import checkpoint

    monkeypatch.setattr(checkpoint, "_shipped_root", lambda: tmp_path / "none")
    assert main(["models"]) == 2
    error = capsys.readouterr().err
    assert "this install has no shipped models" in error and "--model" in error


SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "LICENSE", "README.md", "src", "models")

INSTALLED = """
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import llada
from llada.api import resolve_model_path
from llada.model.checkpoint import resolve_checkpoint

assert Path(llada.__file__).resolve().is_relative_to(site), llada.__file__
for name in sys.argv[2:]:
    folder = resolve_checkpoint(name)
    assert folder == site / "llada" / "shipped_models" / name, folder
    assert resolve_checkpoint(f"models/{name}") == folder
folder, is_random = resolve_model_path(None)
assert (folder.name, is_random) == ("llada-tiny-instruct", False), (folder, is_random)
from llada.cli.main import main

assert main(["models", "llada-tiny-base"]) == 0
try:
    resolve_checkpoint("models/no-such-model")
except FileNotFoundError as error:
    print("MISSING", error)
"""


@pytest.mark.slow
def test_a_built_wheel_carries_the_shipped_models_and_finds_them_installed(tmp_path):
    source = tmp_path / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                source / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
            )
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-q", "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("llada_kit-*.whl")
    assert wheel.name.startswith(f"llada_kit-{llada.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"llada_kit-{llada.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        assert f"{info}/licenses/LICENSE" in names
        for name in SHIPPED:
            for file in (ROOT / "models" / name).iterdir():
                packed = archive.getinfo(f"llada/shipped_models/{name}/{file.name}")
                assert packed.file_size == file.stat().st_size, file
        site = tmp_path / "site"
        archive.extractall(site)
    assert "License-Expression: Apache-2.0" in metadata
    assert "[lm_eval.models]\nllada = llada.eval.lm_eval:LLaDAEvalLM" in entry_points
    assert "llada = llada.cli.main:main" in entry_points

    # The unpacked wheel first on sys.path, away from the source checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INSTALLED), str(site), *SHIPPED],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(site / "llada" / "shipped_models" / "llada-tiny-base")  # llada models
    (missing,) = [line for line in lines if line.startswith("MISSING")]
    assert f"(shipped models: {', '.join(SHIPPED)})" in missing
