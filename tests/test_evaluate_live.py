"""Tier 3: `pymk evaluate`'s two modes give the same lists — the past replayed through Kafka into a real worker
(lists consumed from the recommendations topic) and the same code offline over the past graph in memory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from conftest import BUNDLED_DATA
from pymk.datasets import EdgeHistory, load_edge_history
from pymk.index.ann import AnnConfig
from pymk.index.sage import load_model
from pymk.ranking.candidates import CandidateConfig
from pymk.ranking.evaluation import make_split
from pymk.ranking.model import Ranker
from pymk.ranking.product import ProductMethod, past_source, train_product_models
from pymk.settings import Settings
from pymk.streams.evaluate_live import partition_as_of, replay_past


def test_live_and_offline_modes_publish_identical_lists(kafka_settings: Settings, tmp_path: Path) -> None:
    full = load_edge_history(BUNDLED_DATA / "collegemsg" / "CollegeMsg.txt")
    # a small graph: the first 2,500 connections of CollegeMsg (a few hundred users)
    history = EdgeHistory(full.path, full.timed, full.connections[:2500], [], 0, 2500)
    split = make_split(history, "time")
    models = train_product_models(split, history, tmp_path / "models", epochs=3)

    live = replay_past(replace(kafka_settings, partitions=4), split, models, k=50, timeout_s=600,
                       log_dir=tmp_path)

    model, _ = load_model(models.sage_dir)
    source = past_source(split, model, models.sage_version, AnnConfig())
    offline = ProductMethod("offline", source, Ranker.load(models.ranker_dir), CandidateConfig(),
                            partition_as_of(split.past_connections, 4))
    users = sorted(source.users())
    assert len(live.lists) == len(users), "every past user gets a list"
    differing = [u for u in users if [item.candidate for item in live.lists[u].items] != offline.rank(u, 50)]
    # Nearly all lists are identical item by item. A user or two per run differ by a swap deep in the list: a
    # feature that differs in its last bits between the worker's state and the in-memory graph (not pinned down
    # yet) can flip a tree's decision. A real divergence — a feature missing on one side — changes every list.
    assert len(differing) <= 0.02 * len(users), f"{len(differing)} of {len(users)} lists differ: {differing[:10]}"
    for user in differing:
        live_items = {item.candidate for item in live.lists[user].items}
        offline_items = set(offline.rank(user, 50))
        assert len(live_items & offline_items) >= 0.9 * len(offline_items), user
