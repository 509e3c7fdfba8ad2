"""Tier 3: a worker serving with the two-tower model (real broker) — Stage 1's ANN in the two-tower space
(``PYMK_ANN_SPACE=two-tower``) and Stage 2 by the blend of the XGBoost ranker and the towers; lists keep the
invariants and their reasons."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from test_stream_recommendations import assert_list_valid

from pymk.ranking.two_tower import TwoTowerConfig, train_two_tower
from pymk.settings import Settings
from pymk.streams.models import SHIPPED_MODELS
from pymk.streams.topics import ensure_topics
from pymk.train import connections_and_profiles
from stream_helpers import dismissals, final_graph, latest_lists, send, settle, small_network
from workers import http_get, running_worker


def test_worker_ranks_with_the_blend_and_searches_the_two_tower_space(kafka_settings: Settings,
                                                                       tmp_path: Path) -> None:
    events = small_network(240, seed=5)
    connections, profiles = connections_and_profiles(events)
    towers = train_two_tower(connections, profiles, SHIPPED_MODELS / "embeddings", tmp_path / "towers",
                             TwoTowerConfig(epochs=2, min_steps_per_epoch=5, progress=False))
    tower_version = str(towers.metadata["version"])
    settings = replace(kafka_settings, reembed_min_interval_ms=0, refresh_scope="two-hop", ranker_kind="blend",
                       ann_space="two-tower", two_tower_model=str(towers.model_dir))
    ensure_topics(settings)
    send(settings, events)
    with running_worker(settings, tmp_path / "worker.log"):
        settle(settings, [settings])
        stats = http_get(settings, "/stats")
        # every embedded user has a candidate-tower vector, computed with the served model
        assert stats["index"]["ann_space"] == "two-tower"
        assert stats["index"]["tower_space"]["users"] == stats["index"]["users"] > 200
        assert stats["index"]["tower_space"]["model_version"] == tower_version
        graph, dismissed = final_graph(events), dismissals(events)
        lists = latest_lists(settings)
        assert len(lists) >= 0.9 * graph.number_of_nodes()
        ann_items = 0
        for user, recs in lists.items():
            assert_list_valid(recs, set(graph[user]) if user in graph else set(), dismissed.get(user, set()))
            assert recs.model_version.startswith("blend(") and tower_version in recs.model_version
            for item in recs.items:
                if "ann" in item.sources:
                    ann_items += 1
                    assert item.reasons.get("similar_profile") is True
        assert ann_items > 0  # the two-tower space did bring candidates
