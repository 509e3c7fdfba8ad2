"""Tier 1: the edge-list formats read as the evaluation protocol defines connections."""

from __future__ import annotations

import gzip
from pathlib import Path

from conftest import BUNDLED_DATA, EGO_FACEBOOK
from pymk.datasets import UNTIMED_START_MS, load_edge_history


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    return path


def test_untimed_pairs_in_file_order_without_duplicates_or_self_loops(tmp_path: Path) -> None:
    history = load_edge_history(write(tmp_path, "# comment\n3 1\n1 3\n2 2\n4 5\n"))
    assert not history.timed
    assert history.connections == [(1, 3, UNTIMED_START_MS), (4, 5, UNTIMED_START_MS + 1000)]
    assert history.self_loops == 1 and history.repeats == []


def test_timed_first_interaction_is_the_connection_and_later_ones_are_repeats(tmp_path: Path) -> None:
    history = load_edge_history(write(tmp_path, "5 1 30\n1 5 10\n2 9 10\n7 7 11\n1 5 40\n"))
    # ties at ts=10 order by the smaller id, then the larger
    assert history.connections == [(1, 5, 10_000), (2, 9, 10_000)]
    assert sorted(history.repeats) == [(1, 5, 40_000), (5, 1, 30_000)]


def test_konect_format_with_header(tmp_path: Path) -> None:
    history = load_edge_history(write(tmp_path, "% sym unweighted\n% 3 3 3\n1 2 1 200\n2 3 1 100\n"))
    assert history.connections == [(2, 3, 100_000), (1, 2, 200_000)]


def test_bundled_collegemsg() -> None:
    history = load_edge_history(BUNDLED_DATA / "collegemsg" / "CollegeMsg.txt")
    assert history.timed and history.lines == 59_835
    assert len(history.users) == 1_899
    assert len(history.connections) + len(history.repeats) + history.self_loops == history.lines
    times = [ts for _, _, ts in history.connections]
    assert times == sorted(times)


def test_gzipped_file_reads_like_the_plain_one(tmp_path: Path) -> None:
    text = "% konect\n1 2 1 200\n2 3 1 100\n"
    zipped = tmp_path / "graph.txt.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    assert load_edge_history(zipped).connections == load_edge_history(write(tmp_path, text)).connections


def test_bundled_graphs_have_their_documented_sizes() -> None:
    # The sizes data/README.md states: the copies are whole, and the .gz ones decompress through the loader.
    ego = load_edge_history(EGO_FACEBOOK)
    assert not ego.timed and ego.lines == 88_234 and len(ego.users) == 4_039
    hepph = load_edge_history(BUNDLED_DATA / "ca-hepph" / "CA-HepPh.txt.gz")
    # 12,008 nodes, 2 of them only in self-loops, which the loader drops
    assert not hepph.timed and hepph.lines == 118_521 and len(hepph.users) == 12_006
    digg = load_edge_history(BUNDLED_DATA / "digg-reply" / "digg_reply.txt.gz")
    assert digg.timed and digg.lines == 87_627
