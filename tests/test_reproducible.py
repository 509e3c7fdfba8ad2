"""Reproducible evaluation (issue 20): the same data, code and seed train the same models and give the same
scores; and the evaluation's model cache is reused only for the same data bytes, split, split seed, features and
training configs. Small graphs and tiny configs: seconds, no broker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pymk import evaluate
from pymk.datasets import load_edge_history
from pymk.index.ann import AnnConfig
from pymk.index.training import EmbeddingTrainingConfig, train_embeddings
from pymk.model_artifact import weights_digest
from pymk.ranking.evaluation import make_split
from pymk.ranking.model import Ranker, RankerConfig
from pymk.ranking.product import (
    ProductModels,
    ProductTrainingConfigs,
    product_methods,
    ranker_training_config,
    train_product_models,
)
from pymk.ranking.training_data import TrainingDataConfig, build_training_data
from pymk.synthetic import SyntheticConfig, synthetic_network

# embedding_dim: the serving width (MemorySource holds 128-d vectors).
TINY_SAGE = EmbeddingTrainingConfig(epochs=2, batch_size=64, max_steps_per_epoch=4, hidden_dim=16, embedding_dim=128,
                                    identity_dim=8, extra_negatives=16, progress=False, threads=1)
TINY_RANKER = RankerConfig(n_estimators=20, max_depth=3, train_threads=2, early_stopping_rounds=None)


def community_edges(path: Path, users: int = 120, seed: int = 5) -> Path:
    """An edge-list file ``u v ts(seconds)``: four communities, random times."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(users):
        for v in range(u + 1, users):
            if rng.random() < (0.12 if u % 4 == v % 4 else 0.01):
                lines.append(f"{u} {v} {1_000_000 + int(rng.integers(0, 5_000_000))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_configs(kind: str) -> ProductTrainingConfigs:
    split_kind = "time" if kind == "time" else "random"
    data = TrainingDataConfig(replay="temporal" if split_kind == "time" else "holdout", queries_per_checkpoint=30,
                              holdout_queries=40, unshown_negatives=10, horizon_days=7)
    return ProductTrainingConfigs(TINY_SAGE, data, TINY_RANKER)


def test_graphsage_training_twice_with_one_seed_gives_the_same_weights(tmp_path: Path) -> None:
    connections = load_edge_history(community_edges(tmp_path / "g.txt")).connections
    first = train_embeddings(connections, None, tmp_path / "a", TINY_SAGE)
    second = train_embeddings(connections, None, tmp_path / "b", TINY_SAGE)
    other_seed = train_embeddings(connections, None, tmp_path / "c", EmbeddingTrainingConfig(
        **{**TINY_SAGE.__dict__, "seed": 1}))
    assert weights_digest(first.model) == weights_digest(second.model)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert weights_digest(other_seed.model) != weights_digest(first.model)  # the seed does reach the training


def test_xgboost_training_twice_with_one_seed_gives_the_same_trees() -> None:
    network = synthetic_network(SyntheticConfig(n_users=200, seed=3, avg_degree=10, duration_days=40))
    config = TrainingDataConfig(horizon_days=7, queries_per_checkpoint=40, unshown_negatives=10)
    data, again = build_training_data(network, config), build_training_data(network, config)
    assert np.array_equal(data.features, again.features, equal_nan=True)
    assert np.array_equal(data.labels, again.labels) and np.array_equal(data.row_weights(), again.row_weights())
    x, y = data.train_split()
    first = Ranker.train(x, y, config=TINY_RANKER, weights=data.row_weights()[~data.is_val])
    second = Ranker.train(x, y, config=TINY_RANKER, weights=data.row_weights()[~data.is_val])
    assert bytes(first.booster.save_raw("ubj")) == bytes(second.booster.save_raw("ubj"))
    assert np.array_equal(first.predict(x), second.predict(x))


@pytest.mark.parametrize("kind", ["time", "random"])
def test_the_product_trained_twice_ranks_every_user_the_same(tmp_path: Path, kind: str) -> None:
    """The whole evaluation training path (GraphSAGE, embeddings at checkpoints, ranker rows, XGBoost), then the
    product's rows: same versions (weights digests and their stamp, which salts the embeddings) and lists."""
    history = load_edge_history(community_edges(tmp_path / "g.txt"))
    split = make_split(history, kind, 0)  # type: ignore[arg-type]
    configs = tiny_configs(kind)
    assert configs.ranker_data.replay == ranker_training_config(split).replay
    runs: list[ProductModels] = [train_product_models(split, history, tmp_path / name, configs=configs)
                                 for name in ("a", "b")]
    assert runs[0].sage_version == runs[1].sage_version
    assert runs[0].sage_version.startswith("sage-1970")  # stamped with the data's time, not the clock
    assert (runs[0].ranker_dir / "model.ubj").read_bytes() == (runs[1].ranker_dir / "model.ubj").read_bytes()
    ann = AnnConfig()
    lists = []
    for models in runs:
        methods = product_methods(split, models, ann)
        lists.append([[m.rank(user, 20) for m in methods] for user in split.query_users[:40]])  # type: ignore[attr-defined]
    assert lists[0] == lists[1]


# ---- the evaluation's model cache ----------------------------------------------------------------------------------
@pytest.fixture()
def counted_training(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the (slow) training by a stub that records where it trained."""
    trained: list[Path] = []

    def fake_train(split: object, history: object, out_dir: Path, progress: bool = False,
                   configs: object = None, sage: tuple[Path, str] | None = None) -> ProductModels:
        trained.append(out_dir)
        if sage is None:  # "trains" GraphSAGE
            (out_dir / "sage").mkdir(parents=True)
            (out_dir / "sage" / "metadata.json").write_text("{}")
            sage = (out_dir / "sage", f"sage-{len(trained)}")
        return ProductModels(sage[0], out_dir / "ranker", sage[1], f"xgb-{len(trained)}")

    monkeypatch.setattr(evaluate, "train_product_models", fake_train)
    return trained


def cached(tmp_path: Path, data: Path, kind: str, seed: int) -> tuple[ProductModels, Path]:
    history = load_edge_history(data)
    split = make_split(history, kind, seed)  # type: ignore[arg-type]
    cache_dir = evaluate.model_cache_dir(tmp_path / "models", data, split)
    models, _ = evaluate.product_models(split, history, cache_dir, retrain=False, progress=False)
    return models, cache_dir


def test_the_cache_is_reused_for_the_same_inputs_only(tmp_path: Path, counted_training: list[Path]) -> None:
    data = community_edges(tmp_path / "g.txt")
    first, first_dir = cached(tmp_path, data, "random", 0)
    again, again_dir = cached(tmp_path, data, "random", 0)
    assert len(counted_training) == 1 and again == first and again_dir == first_dir  # reused

    other_seed, other_dir = cached(tmp_path, data, "random", 1)  # seed 0's past holds most of seed 1's future
    assert len(counted_training) == 2 and other_dir != first_dir and other_seed != first

    time_split, _ = cached(tmp_path, data, "time", 0)
    assert len(counted_training) == 3
    assert cached(tmp_path, data, "time", 7)[0] == time_split  # the time split does not depend on a seed

    data.write_text(data.read_text() + "0 119 9999999\n")  # same file name, other bytes
    edited, edited_dir = cached(tmp_path, data, "random", 0)
    assert len(counted_training) == 4 and edited_dir != first_dir and edited != first
    marker = json.loads((edited_dir / "models.json").read_text())
    assert {"data_sha256", "split", "split_seed", "features", "training"} <= set(marker["inputs"])


def test_the_cache_key_follows_the_features_and_the_training_configs(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = community_edges(tmp_path / "g.txt")
    split = make_split(load_edge_history(data), "time", 0)
    base = evaluate.cache_inputs(data, split)
    assert evaluate.cache_inputs(data, split) == base
    # a hub degree (PYMK_HUB_DEGREE) trains the ranker on other rows: another cache folder
    assert evaluate.cache_inputs(data, split, hub_degree=2)["training"] != base["training"]
    assert evaluate.model_cache_dir(tmp_path, data, split, 2) != evaluate.model_cache_dir(tmp_path, data, split)
    monkeypatch.setattr(evaluate, "product_training_configs", lambda split, epochs=20, progress=False, hub_degree=0:
                        tiny_configs("time"))
    assert evaluate.cache_inputs(data, split)["training"] != base["training"]
    monkeypatch.undo()
    import pymk.ranking.features as features

    monkeypatch.setattr(features, "FEATURE_NAMES", [*features.FEATURE_NAMES, "new_feature"])
    assert evaluate.cache_inputs(data, split)["features"] != base["features"]


def test_a_new_ranker_reuses_the_graphsage_model_of_the_same_past(tmp_path: Path, counted_training: list[Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing the ranker's columns or configs retrains the ranker only; other data or another split seed
    retrain GraphSAGE too."""
    data = community_edges(tmp_path / "g.txt")
    first, first_dir = cached(tmp_path, data, "random", 0)
    import pymk.ranking.features as features

    monkeypatch.setattr(features, "FEATURE_NAMES", [*features.FEATURE_NAMES, "new_feature"])
    other_ranker, other_dir = cached(tmp_path, data, "random", 0)
    assert len(counted_training) == 2 and other_dir != first_dir
    assert (other_ranker.sage_dir, other_ranker.sage_version) == (first.sage_dir, first.sage_version)
    assert other_ranker.ranker_version != first.ranker_version

    other_seed, _ = cached(tmp_path, data, "random", 1)
    assert other_seed.sage_version not in (first.sage_version,)
    assert other_seed.sage_dir != first.sage_dir
