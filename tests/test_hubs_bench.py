"""`pymk bench hubs` (bench/hubs.py): the hub policy's effect on the heuristics and on work, on graphs small
enough to count by hand."""

from __future__ import annotations

from pathlib import Path

from pymk.bench.hubs import _event_fanout, bench_hubs
from pymk.datasets import load_edge_history
from pymk.ranking.evaluation import CommonNeighbours, make_split, score_method


def test_a_star_fans_out_to_its_leaves_until_its_centre_is_a_hub() -> None:
    star = [(0, leaf, leaf) for leaf in range(1, 8)]
    # the n-th leaf reaches the n − 1 earlier ones through the centre (degree n); a leaf has no other neighbour
    assert _event_fanout(star, 0) == {"mean": 3.0, "p99": 5.9, "max": 6}
    capped = _event_fanout(star, 3)  # from the 4th leaf on, the centre is a hub: nobody's 2-hop changes
    assert capped["max"] == 2 and capped["mean"] == round((0 + 1 + 2) / 7, 1)


def test_no_cap_is_the_evaluation_and_a_cap_only_removes(tmp_path: Path) -> None:
    edges = [(0, i) for i in range(1, 30)] + [(i, i + 1) for i in range(1, 29)] + [(1, 5), (2, 9), (3, 12)]
    path = tmp_path / "g.txt"
    path.write_text("".join(f"{u} {v} {t}\n" for t, (u, v) in enumerate(edges)))
    result = bench_hubs([(path, "random")], caps=(0, 10, 3))["graphs"][0]
    uncapped, ten, three = result["rows"]
    split = make_split(load_edge_history(path), "random")
    assert uncapped["recall_at_20"]["CN"] == round(score_method(split, CommonNeighbours(split), ks=(20,)).recall[20], 4)
    assert uncapped["hubs"] == 0 and 0 < ten["hubs"] <= three["hubs"]
    assert (uncapped["two_hop_entries_read_per_list"] > ten["two_hop_entries_read_per_list"]
            >= three["two_hop_entries_read_per_list"])
    assert (uncapped["future_pairs_reachable_in_2_hops"] >= ten["future_pairs_reachable_in_2_hops"]
            >= three["future_pairs_reachable_in_2_hops"])
    assert (uncapped["users_whose_2_hop_changes_per_connection_event"]["mean"]
            > ten["users_whose_2_hop_changes_per_connection_event"]["mean"])
