"""Tier 1: Stage 1's ANN in the two-tower space (index/tower_index.py) — it returns the exact top-k of the
towers' scores, follows changed embeddings, and rebuilds when the model changes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pymk.index.ann import AnnConfig
from pymk.index.tower_index import TowerSpaceIndex


class FakeTower:
    """Candidate vector = a unit projection of the source's value for the user; query vector likewise, with
    another projection: enough to check the index against brute force."""

    def __init__(self, version: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._version = version
        self.query_projection = rng.normal(size=(8, 64)).astype(np.float32)
        self.candidate_projection = rng.normal(size=(8, 64)).astype(np.float32)

    @property
    def version(self) -> str:
        return self._version

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def query_vector(self, user: int, source: object) -> np.ndarray:
        return self._unit(source[user] @ self.query_projection)  # type: ignore[index]

    def candidate_vectors(self, users: Sequence[int] | np.ndarray, source: object) -> np.ndarray:
        return self._unit(np.stack([source[int(u)] for u in users]) @ self.candidate_projection)  # type: ignore[index]


def brute_force(tower: FakeTower, source: dict[int, np.ndarray], user: int, k: int, exclude: set[int]
                ) -> list[int]:
    others = [u for u in sorted(source) if u != user and u not in exclude]
    scores = tower.candidate_vectors(others, source) @ tower.query_vector(user, source)
    return [others[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_search_is_the_exact_top_k_of_the_tower_scores_and_follows_changes() -> None:
    rng = np.random.default_rng(0)
    source = {u: rng.normal(size=8).astype(np.float32) for u in range(300)}
    tower = FakeTower("tt-1", seed=1)
    index = TowerSpaceIndex(AnnConfig(ef_search=512))
    assert index.sync(tower, source, lambda: list(source)) == 300 and len(index) == 300
    assert index.sync(tower, source, lambda: list(source)) == 0  # nothing changed: nothing recomputed
    for user in (0, 17, 123):
        got = index.neighbours(tower, user, source, 10, exclude={1, 2})
        assert [u for u, _ in got] == brute_force(tower, source, user, 10, {1, 2})
        query = tower.query_vector(user, source)
        for other, score in got:  # the score is the towers' dot product
            assert abs(score - float(tower.candidate_vectors([other], source)[0] @ query)) < 1e-5

    # a changed embedding: recomputed at the next sync, found only under its new vector
    query = tower.query_vector(0, source)
    best_direction = np.linalg.lstsq(tower.candidate_projection.T, query, rcond=None)[0]
    source[5] = best_direction.astype(np.float32)  # its candidate vector now (nearly) equals user 0's query
    index.mark([5])
    assert index.sync(tower, source, lambda: list(source)) == 1
    (top, score), = index.neighbours(tower, 0, source, 1, exclude=set())
    assert top == 5 and abs(score - float(tower.candidate_vectors([5], source)[0] @ query)) < 1e-5
    assert [u for u, _ in index.neighbours(tower, 0, source, 5, set())] == brute_force(tower, source, 0, 5, set())

    # a deleted embedding leaves the index
    index.mark([5], deleted=True)
    index.sync(tower, source, lambda: list(source))
    assert 5 not in [u for u, _ in index.neighbours(tower, 0, source, 50, set())] and len(index) == 299


def test_a_new_model_version_rebuilds_the_whole_space() -> None:
    rng = np.random.default_rng(2)
    source = {u: rng.normal(size=8).astype(np.float32) for u in range(100)}
    index = TowerSpaceIndex(AnnConfig(ef_search=256))
    index.sync(FakeTower("tt-1", seed=1), source, lambda: list(source))
    new_model = FakeTower("tt-2", seed=9)
    assert index.sync(new_model, source, lambda: list(source)) == 100
    assert index.model_version == "tt-2"
    got = [u for u, _ in index.neighbours(new_model, 3, source, 10, set())]
    assert got == brute_force(new_model, source, 3, 10, set())
