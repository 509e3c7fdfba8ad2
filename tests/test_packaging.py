"""pymk as a user installs it: a non-editable `pip install .` (what the Docker image does) must find its shipped
models and graphs (package data ``pymk.data``) and start a worker, with no source tree beside it."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from pymk.settings import Settings
from workers import http_get, running_worker

# What a copy of the source tree leaves out: the environment, state and caches, never tracked files.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".pymk", "reports", "build", "*.egg-info", "__pycache__",
                                     ".hypothesis", ".pytest_cache", ".ruff_cache")


def _run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a wheel built from a copy of the source tree, the python of a fresh venv it is installed into). The
    venv reaches the test environment's dependencies (torch, faiss, …) through a .pth line, which adds their
    folder without its .pth files, so the test environment's editable pymk is not visible there."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w",
          str(root / "wheel")], cwd=root)
    wheel = next((root / "wheel").glob("pymk-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root).strip())
    (purelib / "pymk-test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(purelib), str(wheel)], cwd=root)
    return wheel, python


def _tracked_data_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "data"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return set(listed.stdout.split())
    return {str(p.relative_to(REPO)) for p in (REPO / "data").rglob("*") if p.is_file()}


def test_the_wheel_ships_every_bundled_data_file(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(f for f in _tracked_data_files() if f"pymk/{f}" not in names)
    assert not missing, f"data files left out of the wheel: {missing}"
    assert "pymk/ranking/tree_eval.c" in names  # compiled at model load where the worker runs


def test_an_installed_pymk_finds_its_models_and_graphs_outside_the_source_tree(
        installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, python = installed
    probe = ("import json, pymk\n"
             "from pymk.streams.models import SHIPPED_MODELS\n"
             "from pymk.demo import DATA\n"
             "from pymk.cli import DEFAULT_BENCH_DATA\n"
             "print(json.dumps({'package': pymk.__file__, 'models': str(SHIPPED_MODELS), 'demo': str(DATA),\n"
             "                  'bench': str(DEFAULT_BENCH_DATA),\n"
             "                  'exist': [p.exists() for p in (SHIPPED_MODELS, DATA, DEFAULT_BENCH_DATA)]}))\n")
    env_free = tmp_path / "elsewhere"  # no data/ here, no PYMK_DATA_DIR
    env_free.mkdir()
    done = subprocess.run([str(python), "-c", probe], cwd=env_free, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    site_packages = Path(found["package"]).parents[1]
    assert site_packages.is_relative_to(python.parents[1]), found  # the installed copy, not the source tree
    assert found["exist"] == [True, True, True], found
    for key in ("models", "demo", "bench"):
        assert Path(found[key]).is_relative_to(site_packages), found


def test_an_installed_worker_serves_with_the_shipped_models(installed: tuple[Path, Path], kafka_settings: Settings,
                                                             tmp_path: Path) -> None:
    _, python = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running_worker(kafka_settings, tmp_path / "worker.log", python=str(python), cwd=elsewhere):
        models = http_get(kafka_settings, "/stats")["models"]
    shipped = {kind: json.loads((REPO / "data" / "models" / kind / "metadata.json").read_text())["version"]
               for kind in ("embeddings", "ranker")}
    assert models["embeddings"]["version"] == shipped["embeddings"]
    assert models["ranker"]["version"] == shipped["ranker"]
    for kind in ("embeddings", "ranker"):
        assert Path(models[kind]["path"]).is_relative_to(python.parents[1]), models
