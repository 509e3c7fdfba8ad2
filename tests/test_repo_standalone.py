"""Tier 1: the repository stands alone. A clone gets this repository and nothing beside it, so no tracked file
(code, tests, benches, docs, data notes) may name a sibling folder or one machine's absolute path.

``git grep`` scans every tracked file, binary ones included. There is no skip: without git, or outside a git
checkout, the test fails, since the property it guards would then go unchecked.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

THIS_FILE = "tests/test_repo_standalone.py"  # it spells the patterns out, so it is left out of its own scan

# Extended regular expressions (git grep -E), each with what it catches.
FORBIDDEN = {
    r"\.\./shared": "the sibling folder ../shared",
    r"shared/(data|CONTRACT)": "the sibling folder's data or contract",
    r"\"shared\" */": "a path built to the sibling folder (.. / \"shared\" / \"data\")",
    r"__file__.*(\.parent\.parent\.parent|parents\[[2-9]\])": "a path climbing out of the repository from a "
                                                            "top-level folder",
    r"/work/|/root/|/home/|/Users/|/mnt/": "an absolute path of one machine",
    r"[A-Za-z]:[\\/](Users|Documents)": "a Windows machine path",
}


def _git_path() -> str:
    git = shutil.which("git")
    assert git is not None, "git is not on PATH: the standalone check cannot run"
    return git


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_git_path(), *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_this_is_the_top_of_a_git_checkout() -> None:
    top = _git("rev-parse", "--show-toplevel")
    assert top.returncode == 0, f"not a git checkout: {top.stderr.strip()}"
    assert top.stdout.strip() and REPO.samefile(top.stdout.strip())
    tracked = _git("ls-files").stdout.splitlines()
    assert {"README.md", "pymk/cli.py"} <= set(tracked), "the scan would not see the repository's files"


def test_no_tracked_file_names_a_sibling_folder_or_a_machine_path() -> None:
    patterns = [arg for pattern in FORBIDDEN for arg in ("-e", pattern)]
    found = _git("grep", "-n", "-E", *patterns, "--", ".", f":(exclude){THIS_FILE}")
    # git grep: 0 = matches, 1 = none, anything else = it failed (which must not pass as "none")
    assert found.returncode in (0, 1), f"git grep failed ({found.returncode}): {found.stderr.strip()}"
    assert found.returncode == 1, (
        "tracked files reach outside the repository (patterns: "
        + "; ".join(f"{p} = {why}" for p, why in FORBIDDEN.items()) + "):\n" + found.stdout)


def test_the_patterns_catch_what_they_are_meant_to(tmp_path: Path) -> None:
    # A pattern that matches nothing would make the scan above pass vacuously: each sample, alone in a file,
    # must be caught by the same git grep.
    samples = ["see ../shared/CONTRACT.md", 'REPO.parent / "shared" / "data"', "/work/shared/data/x.txt",
               "Path(__file__).resolve().parent.parent.parent", "Path(__file__).parents[2]", "/home/me/pymk",
               "/root/pymk", "C:\\Users\\me"]
    patterns = [arg for pattern in FORBIDDEN for arg in ("-e", pattern)]
    for number, sample in enumerate(samples):
        (tmp_path / f"{number}.txt").write_text(sample + "\n")
        found = subprocess.run([_git_path(), "grep", "--no-index", "-q", "-E", *patterns, "--", f"{number}.txt"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert found.returncode == 0, f"no pattern catches {sample!r} ({found.returncode}: {found.stderr.strip()})"


def test_default_data_paths_are_inside_the_clone() -> None:
    from pymk.bench.evaluation_check import DEFAULT_DATA_DIR, GRAPHS
    from pymk.bench.rank import DEFAULT_GRAPH
    from pymk.cli import DEFAULT_BENCH_DATA
    from pymk.demo import DATA
    from pymk.streams.models import SHIPPED_MODELS

    paths = [DEFAULT_BENCH_DATA, DATA, DEFAULT_GRAPH, SHIPPED_MODELS, *(DEFAULT_DATA_DIR / name for name, _ in GRAPHS)]
    for path in paths:
        assert path.exists() and path.resolve().is_relative_to(REPO.resolve()), path


def test_without_the_source_tree_data_is_found_from_the_environment_or_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither a source tree nor the installed package data (pymk.data): PYMK_DATA_DIR, then ./data, are searched.
    from pymk import paths

    monkeypatch.setattr(paths, "REPO_DATA_DIR", tmp_path / "clone" / "data")
    monkeypatch.setattr(paths, "INSTALLED_DATA_DIR", tmp_path / "site-packages" / "pymk" / "data")
    monkeypatch.delenv("PYMK_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.bundled_data("g.txt") == tmp_path / "site-packages" / "pymk" / "data" / "g.txt"  # in the error
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "g.txt").write_text("1 2\n")
    assert paths.bundled_data("g.txt") == tmp_path / "data" / "g.txt"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "g.txt").write_text("1 2\n")
    monkeypatch.setenv("PYMK_DATA_DIR", str(tmp_path / "mine"))
    assert paths.bundled_data("g.txt") == tmp_path / "mine" / "g.txt"
    # A non-editable install's package data comes before ./data
    monkeypatch.delenv("PYMK_DATA_DIR")
    (tmp_path / "site-packages" / "pymk" / "data").mkdir(parents=True)
    (tmp_path / "site-packages" / "pymk" / "data" / "g.txt").write_text("1 2\n")
    assert paths.bundled_data("g.txt") == tmp_path / "site-packages" / "pymk" / "data" / "g.txt"
