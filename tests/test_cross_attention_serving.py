"""Tier 3: a worker serving with the cross-attention re-ranker (``PYMK_RERANKER=cross-attention``, real broker).
Every published list keeps the invariants; its items say which model placed them (the re-ranker's version for the
re-ranked head, "stage2" below it) and their reasons still name the features and the mutual connections. The
re-ranker reads candidates of other partitions through what the worker holds (its users and their neighbours'
mirrors), so a list never fails on another partition's user."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from test_stream_recommendations import assert_list_valid

from conftest import BUNDLED_DATA
from pymk.datasets import EdgeHistory, load_edge_history
from pymk.ranking.cross_attention import CrossAttentionConfig, CrossAttentionRanker, save_model
from pymk.ranking.evaluation import make_split
from pymk.ranking.product import train_product_models
from pymk.reproducible import deterministic
from pymk.settings import Settings
from pymk.streams.evaluate_live import replay_past
from pymk.streams.topics import ensure_topics
from stream_helpers import dismissals, final_graph, latest_lists, send, settle, small_network
from workers import http_get, running_worker


def test_worker_reranks_the_head_and_says_which_model_placed_each_item(kafka_settings: Settings,
                                                                       tmp_path: Path) -> None:
    # Untrained weights: this test is about the serving path (tokens from a partition's state, one forward pass
    # per list, the item records), not about quality; they cost what trained ones cost.
    with deterministic(0, threads=1):
        model = CrossAttentionRanker(CrossAttentionConfig(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0,
                                                          fanout=(4, 4), top_n=30))
    model.version = "xattn-serving-test"
    save_model(model, tmp_path / "reranker")
    settings = replace(kafka_settings, reembed_min_interval_ms=0, refresh_scope="two-hop",
                       reranker="cross-attention", reranker_model=str(tmp_path / "reranker"))
    ensure_topics(settings)
    events = small_network(240, seed=7)
    send(settings, events)
    with running_worker(settings, tmp_path / "worker.log"):
        settle(settings, [settings])
        stats = http_get(settings, "/stats")
        graph, dismissed = final_graph(events), dismissals(events)
        lists = latest_lists(settings)
    assert stats["models"]["reranker"]["version"] == model.version
    assert len(lists) >= 0.9 * graph.number_of_nodes()
    placed_by_model = placed_by_stage2 = with_mutuals = 0
    for user, recs in lists.items():
        assert_list_valid(recs, set(graph[user]) if user in graph else set(), dismissed.get(user, set()))
        assert recs.model_version.endswith(f"+{model.version}")
        for item in recs.items:
            assert item.reasons["placed_by"] in (model.version, "stage2")
            assert "top_features" in item.reasons and "mutual_connections" in item.reasons
            if item.reasons["placed_by"] == model.version:
                placed_by_model += 1
                assert isinstance(item.reasons["stage2_score"], float)
            else:
                placed_by_stage2 += 1
            with_mutuals += item.reasons["mutual_connections"] > 0
    # the top 20 of a list comes from its re-ranked top 30; lists shorter than that are all re-ranked
    assert placed_by_model > 0 and placed_by_stage2 == 0
    assert with_mutuals > 0  # the reasons still name mutual connections where there are some


def test_live_evaluation_replays_into_a_reranking_worker(kafka_settings: Settings, tmp_path: Path) -> None:
    """``pymk evaluate --live --reranker``'s second replay: the worker serves the given re-ranker, so every
    published list is re-ranked by it, under the row's own name."""
    full = load_edge_history(BUNDLED_DATA / "collegemsg" / "CollegeMsg.txt")
    history = EdgeHistory(full.path, full.timed, full.connections[:2500], [], 0, 2500)  # a few hundred users
    split = make_split(history, "time")
    models = train_product_models(split, history, tmp_path / "models", epochs=3)
    with deterministic(0, threads=1):
        model = CrossAttentionRanker(CrossAttentionConfig(dropout=0.0))  # untrained: the path, not the quality
    model.version = "xattn-live-test"
    save_model(model, tmp_path / "reranker")
    live = replay_past(replace(kafka_settings, partitions=4), split, models, k=50, timeout_s=600, log_dir=tmp_path,
                       reranker_dir=tmp_path / "reranker")
    assert live.method.name == "hybrid+XGBoost+cross-attention (live)"
    assert live.lists
    for recs in live.lists.values():
        assert recs.model_version.endswith(f"+{model.version}")
        assert all(item.reasons["placed_by"] == model.version for item in recs.items)  # k = top_n = 50
