"""The capacity bench's measurements (bench/capacity.py) on graphs small enough to count by hand."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from pymk.bench.capacity import _graph_state, degree_bucket, project


def _edges(tmp_path: Path, edges: list[tuple[int, int]]) -> Path:
    path = tmp_path / "g.txt"
    path.write_text("".join(f"{u} {v}\n" for u, v in edges))
    return path


def test_degree_buckets_are_powers_of_two() -> None:
    assert [degree_bucket(d) for d in (0, 1, 2, 3, 4, 7, 8, 1000)] == [1, 1, 2, 2, 4, 4, 8, 512]


def test_common_neighbour_entries_and_mirrors_match_the_graph(tmp_path: Path) -> None:
    graph = nx.gnm_random_graph(60, 200, seed=4)
    edges = [(u + 1, v + 1) for u, v in graph.edges()]
    measured = _graph_state(_edges(tmp_path, edges), partitions=4)
    oracle = nx.relabel_nodes(graph, {n: n + 1 for n in graph})
    users = [n for n in oracle if oracle.degree(n) > 0]
    # a row holds every user at the end of a 2-path from u, a neighbour too when they share one (a triangle)
    two_hop = sum(len({w for z in oracle[u] for w in oracle[z]} - {u}) for u in users)
    assert measured["users"] == len(users) and measured["edges"] == len(edges)
    assert measured["common_neighbour_entries_per_user"] == round(two_hop / len(users), 1)
    assert 0 < measured["mirror_copies_per_adjacency_entry"] <= 3  # at most partitions − 1 copies
    parts = measured["bytes_per_user"]
    assert abs(parts["total"] - sum(parts[k] for k in ("adjacency", "mirror", "reverse", "common_neighbours"))) <= 2
    assert sum(row["users"] for row in measured["bytes_by_degree"]) == len(users)
    assert sum(row["events"] for row in measured["work_by_degree"]) == len(edges)


def test_a_hub_costs_work_linear_in_its_degree(tmp_path: Path) -> None:
    star = [(1, leaf) for leaf in range(2, 202)]  # each new leaf meets every earlier leaf at distance 2
    measured = _graph_state(_edges(tmp_path, star), partitions=4)
    last = measured["work_by_degree"][-1]
    assert last["endpoint_degree_sum_from"] >= 127
    # the n-th leaf creates n − 1 new 2-paths, counted on both ends: 2·(n − 1) updates
    assert 2 * (last["endpoint_degree_sum_from"] - 1) <= last["common_neighbour_updates"]
    assert last["common_neighbour_updates"] <= 2 * last["endpoint_degree_sum_to"]


def test_the_projection_bounds_what_it_says(tmp_path: Path) -> None:
    measured = {"graphs": [_graph_state(_edges(tmp_path, [(u, u + 1) for u in range(1, 50)] + [(1, 30)]), 4)],
                "per_user_records": {"hnsw_bytes_per_vector": 800, "user_globals_degree_record_bytes": 150,
                                     "user_globals_profile_record_bytes": 450}}
    today = project(measured, 1e9, 1e5, 4096, 300.0)
    bounded = project(measured, 1e9, 1e5, 4096, 300.0, common_neighbour_cap=1000, sharded=True)
    assert today["machines"]["needed"] is None and today["machines"]["bound_by"] == "ram"  # 1.4 TB on every worker
    assert bounded["bytes_per_user"]["common_neighbours"] <= 1000 * measured["graphs"][0]["bytes_per_entry"][
        "common_neighbours"] + 1
    assert bounded["machines"]["needed"] is not None and bounded["machines"]["ram"] >= 1
    assert project(measured, 1e9, 1e4, 4096, 300.0)["cores"]["lists"] * 10 == today["cores"]["lists"]


def test_counts_on_read_keep_no_common_neighbour_bytes_and_project_without_them(tmp_path: Path) -> None:
    from pymk.bench.capacity import ON_READ, _with_on_read

    path = _edges(tmp_path, [(1, leaf) for leaf in range(2, 80)] + [(2, 3), (3, 4)])
    materialised = _graph_state(path, partitions=4)
    on_read = _graph_state(path, partitions=4, materialise_common=False)
    assert on_read["bytes_per_user"]["common_neighbours"] == 0 < materialised["bytes_per_user"]["common_neighbours"]
    for kind in ("adjacency", "mirror", "reverse"):  # the rest of the state is the same
        assert on_read["bytes_per_user"][kind] == materialised["bytes_per_user"][kind]
    # the same 2-path changes, as marks instead of count updates
    assert (on_read["per_connection_event"]["common_neighbour_updates"]
            == materialised["per_connection_event"]["common_neighbour_updates"])
    measured = {"graphs": [_with_on_read(materialised, on_read)],
                "per_user_records": {"hnsw_bytes_per_vector": 800, "user_globals_degree_record_bytes": 150,
                                     "user_globals_profile_record_bytes": 450}}
    row = project(measured, 1e8, 1e4, 1024, 300.0, common_neighbour_cap=ON_READ)
    assert row["design"] == "on-read" and row["bytes_per_user"]["common_neighbours"] == 0
    assert project(measured, 1e8, 1e4, 1024, 300.0, ON_READ, sharded=True)["design"] == "on-read+sharded"
