"""Tier 1: the serving models — hot reload when `current` moves, rollback one step, a broken model ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pymk.ranking.features import N_FEATURES
from pymk.ranking.model import Ranker, RankerConfig
from pymk.ranking.model_store import SHIPPED_DEFAULT, model_history, point_current, rollback
from pymk.settings import Settings
from pymk.streams.models import Models


def tiny_ranker(seed: int) -> Ranker:
    rng = np.random.default_rng(seed)
    x = rng.random((200, N_FEATURES))
    y = (x[:, 0] + 0.1 * rng.random(200) > 0.5).astype(np.float32)
    return Ranker.train(x, y, config=RankerConfig(n_estimators=5 + seed, early_stopping_rounds=None, seed=seed))


def test_workers_models_follow_current_and_roll_back(tmp_path: Path) -> None:
    settings = Settings.from_env({}, home=tmp_path)
    models = Models(settings)  # nothing trained yet: the shipped GraphSAGE and the shipped or heuristic ranker
    cold_version = models.scorer.version
    assert models.reload_if_changed() == {}

    kind_dir = settings.model_dir / "ranker"
    first, second = tiny_ranker(1), tiny_ranker(2)
    point_current(first.save(kind_dir / first.version))
    assert models.reload_if_changed() == {"ranker": first.version}
    assert models.scorer.version == first.version != cold_version
    point_current(second.save(kind_dir / second.version))
    assert models.reload_if_changed() == {"ranker": second.version}
    assert model_history(kind_dir) == [first.version, second.version]

    assert rollback(kind_dir) == first.version
    assert models.reload_if_changed() == {"ranker": first.version}
    assert model_history(kind_dir) == [first.version]

    # a model that fails to load is not served: the worker keeps the one it has, and logs why
    broken = kind_dir / "xgb-broken"
    broken.mkdir()
    (broken / "model.ubj").write_bytes(b"not a model")
    (broken / "metadata.json").write_text('{"version": "xgb-broken"}')
    point_current(broken)
    assert models.reload_if_changed() == {}
    assert models.scorer.version == first.version

    # from the first trained version, one more rollback returns to the shipped default
    assert rollback(kind_dir) == first.version  # undoes the broken one
    models.reload_if_changed()
    assert models.scorer.version == first.version
    assert rollback(kind_dir) == SHIPPED_DEFAULT
    assert models.reload_if_changed() == {"ranker": cold_version}
    assert model_history(kind_dir) == [] and not (kind_dir / "current").exists()
    with pytest.raises(ValueError, match="no trained version"):
        rollback(kind_dir)
