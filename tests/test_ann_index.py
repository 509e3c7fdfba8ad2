"""The HNSW index under the stream: replacement, deletion, exclusions, rebuilds, SQ8, snapshots.

The central promise, checked everywhere (and by a property test against brute force): a search never
returns a replaced or deleted vector, every score is the inner product of the query with the user's current
vector, and min(k, eligible users) results come back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymk.index.ann as ann
from pymk.index.ann import AnnConfig, AnnIndex

faiss.omp_set_num_threads(1)

DIM = 128
MAX_USER = 2**63 - 1


def hnsw(**fields: Any) -> AnnConfig:
    """A config whose searches walk the graph at any size: these tests are about HNSW (the brute-force rule for
    small indexes has its own test below)."""
    return AnnConfig(exact_search_factor=0, **fields)


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def filled_index(n: int, config: AnnConfig | None = None, seed: int = 0) -> tuple[AnnIndex, np.ndarray, np.ndarray]:
    users = np.random.default_rng(seed + 1).choice(2**40, size=n, replace=False).astype(np.int64) * 7919
    vectors = unit_vectors(n, seed)
    index = AnnIndex(config or hnsw())
    index.upsert(users, vectors)
    return index, users, vectors


def assert_valid_results(
    index: AnnIndex,
    query: np.ndarray,
    results: list[tuple[int, float]],
    k: int,
    exclude: set[int] = frozenset(),  # type: ignore[assignment]
) -> None:
    """The invariants of every search: live, not excluded, current-vector scores, full, sorted, unique."""
    live = set(index.users().tolist())
    eligible = live - set(exclude)
    assert len(results) == min(k, len(eligible))
    users = [user for user, _ in results]
    assert len(set(users)) == len(users)
    for user, score in results:
        assert user in eligible
        current = index.get(user)
        assert current is not None
        assert score == pytest.approx(float(current @ query), abs=1e-5)
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)


def assert_same_as_oracle(index: AnnIndex, query: np.ndarray, k: int, exclude: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    results = index.search(query, k, exclude=exclude)
    oracle = index.exact_search(query, k, exclude=exclude)
    assert_valid_results(index, query, results, k, exclude)
    np.testing.assert_allclose([s for _, s in results], [s for _, s in oracle], atol=1e-5)


def test_added_user_is_its_own_nearest_neighbour() -> None:
    index, users, vectors = filled_index(500)
    assert len(index) == 500
    for row in (0, 17, 499):
        results = index.search(vectors[row], 10)
        assert results[0][0] == users[row]
        assert results[0][1] == pytest.approx(1.0, abs=1e-5)
        assert_valid_results(index, vectors[row], results, 10)
    assert int(users[3]) in index
    assert 12345 not in index
    np.testing.assert_array_equal(index.get(int(users[3])), vectors[3])
    assert index.get(12345) is None


def test_replaced_vector_is_never_found_only_the_new_one() -> None:
    # No rebuild, so the old vectors stay in the HNSW graph as tombstones: the selector alone must hide them.
    index, users, vectors = filled_index(400, hnsw(rebuild_tombstone_fraction=1.0))
    replaced = users[:300]
    new_vectors = unit_vectors(300, seed=99)
    index.upsert(replaced, new_vectors)
    assert index.tombstones == 300 and index.rebuilds == 0 and len(index) == 400
    for row in range(0, 300, 7):
        user = int(replaced[row])
        np.testing.assert_array_equal(index.get(user), new_vectors[row])
        found = index.search(new_vectors[row], 5)
        assert found[0] == (user, pytest.approx(1.0, abs=1e-5))
        old = vectors[row]
        results = index.search(old, 50)
        assert_valid_results(index, old, results, 50)
        # The old vector would score ≈1 with itself; the user may appear, but only scored by its new vector.
        for result_user, score in results:
            if result_user == user:
                assert score == pytest.approx(float(new_vectors[row] @ old), abs=1e-5)
        assert all(score < 0.9 for _, score in results)
    assert index.exact_fallbacks == 0


def test_unchanged_vector_is_not_a_replacement() -> None:
    index, users, vectors = filled_index(50)
    index.upsert(users[:10], vectors[:10])
    assert index.tombstones == 0 and index.n_slots == 50


def test_repeated_user_in_one_batch_keeps_its_last_vector() -> None:
    index = AnnIndex(hnsw())
    vectors = unit_vectors(3, seed=5)
    index.upsert(np.array([7, 7, 8]), vectors)
    assert len(index) == 2 and index.n_slots == 2
    np.testing.assert_array_equal(index.get(7), vectors[1])
    scores = dict(index.search(vectors[0], 2))
    assert scores[7] == pytest.approx(float(vectors[1] @ vectors[0]), abs=1e-6)


def test_delete() -> None:
    index, users, vectors = filled_index(300, hnsw(rebuild_tombstone_fraction=1.0))
    gone = {int(user) for user in users[:100]}
    assert index.delete(list(gone) + [424242]) == 100
    assert index.delete(users[:100]) == 0
    assert len(index) == 200
    for row in range(0, 100, 9):
        assert int(users[row]) not in index and index.get(int(users[row])) is None
        results = index.search(vectors[row], 30)
        assert_valid_results(index, vectors[row], results, 30)
        assert not gone & {user for user, _ in results}


def test_exclusions_are_filtered_inside_the_search() -> None:
    index, users, vectors = filled_index(400)
    query = vectors[0]
    top = index.search(query, 20)
    exclude = {user for user, _ in top[:10]} | {123}  # the best ten, plus a stranger
    results = index.search(query, 20, exclude=exclude)
    assert_valid_results(index, query, results, 20, exclude)
    assert [user for user, _ in results[:10]] == [user for user, _ in top[10:]]
    # Excluding nearly everyone still returns exactly the eligible rest.
    keep = {int(users[5]), int(users[77]), int(users[300])}
    almost_all = set(users.tolist()) - keep
    results = index.search(query, 10, exclude=almost_all)
    assert {user for user, _ in results} == keep
    assert_valid_results(index, query, results, 10, almost_all)
    # The exclusion was temporary.
    assert index.search(query, 20) == top


def test_k_larger_than_live_count_and_empty_index() -> None:
    assert AnnIndex(hnsw()).search(unit_vectors(1, 0)[0], 10) == []
    index, users, vectors = filled_index(30)
    index.delete(users[:5])
    results = index.search(vectors[10], 1000)
    assert len(results) == 25
    assert_valid_results(index, vectors[10], results, 1000)
    assert index.search(vectors[10], 0) == []


def test_search_batch_pads_and_matches_single_search() -> None:
    index, users, vectors = filled_index(200)
    batch_users, batch_scores = index.search_batch(vectors[:5], 8)
    assert batch_users.shape == (5, 8) and batch_scores.shape == (5, 8)
    for row in range(5):
        single = index.search(vectors[row], 8)
        assert batch_users[row].tolist() == [user for user, _ in single]
        np.testing.assert_allclose(batch_scores[row], [score for _, score in single], atol=1e-6)
    small, _, _ = filled_index(3)
    padded_users, padded_scores = small.search_batch(vectors[:2], 5)
    assert (padded_users[:, 3:] == -1).all() and np.isneginf(padded_scores[:, 3:]).all()
    assert (padded_users[:, :3] >= 0).all()


def test_rebuild_triggered_by_tombstones_keeps_oracle_results() -> None:
    index, users, _ = filled_index(300, hnsw(rebuild_tombstone_fraction=0.2))
    rng = np.random.default_rng(3)
    for step in range(6):
        chosen = rng.choice(users, size=40, replace=False)
        index.upsert(chosen, unit_vectors(40, seed=100 + step))
        assert index.tombstones < 0.2 * index.n_slots
    index.delete(users[:30])
    assert index.rebuilds >= 2
    assert len(index) == 270
    for seed in range(10):
        assert_same_as_oracle(index, unit_vectors(1, seed=500 + seed)[0], 25)


def test_sq8_scores_are_exact_and_recall_is_high() -> None:
    index, users, vectors = filled_index(1000, hnsw(quantization="sq8"))
    index.upsert(users[:200], unit_vectors(200, seed=7))
    assert index.config.quantization == "sq8"
    assert index.search(vectors[500], 1)[0] == (int(users[500]), pytest.approx(1.0, abs=1e-5))
    hits = 0
    for seed in range(20):
        query = unit_vectors(1, seed=900 + seed)[0]
        results = index.search(query, 20)
        assert_valid_results(index, query, results, 20)
        hits += len({u for u, _ in results} & {u for u, _ in index.exact_search(query, 20)})
    assert hits / (20 * 20) >= 0.95


def test_sq8_without_float_copy_scores_the_quantised_vector() -> None:
    index, users, vectors = filled_index(300, hnsw(quantization="sq8", keep_vectors=False))
    decoded = index.get(int(users[0]))
    assert decoded is not None and np.abs(decoded - vectors[0]).max() <= 1.0 / 255 + 1e-6
    results = index.search(vectors[0], 5)
    assert results[0][0] == users[0]
    assert results[0][1] == pytest.approx(1.0, abs=0.01)
    index.upsert(users[:100], unit_vectors(100, seed=8))  # forces rebuilds from decoded vectors
    assert index.rebuilds >= 1
    # Fixed-range SQ8 codes survive decode → encode: a rebuild does not drift the vectors.
    np.testing.assert_array_equal(index.get(int(users[200])), filled_index(300, index.config)[0].get(int(users[200])))


@pytest.mark.parametrize("config", [hnsw(), hnsw(quantization="sq8", keep_vectors=False)])
def test_get_many_is_get_for_each_user(config: AnnConfig) -> None:
    index, users, _ = filled_index(300, config)
    index.upsert(users[:50], unit_vectors(50, seed=11))  # replaced vectors: the current one is returned
    index.delete(users[50:60])
    asked = [*users[:70].tolist(), 10**12, int(users[5])]
    many = index.get_many(asked)
    assert many.shape == (len(asked), index.config.dim) and many.dtype == np.float32
    for row, user in zip(many, asked, strict=True):
        single = index.get(user)
        assert np.isnan(row).all() if single is None else np.array_equal(row, single)
    assert index.get_many([]).shape == (0, index.config.dim)


def test_flat_without_float_copy_is_still_exact() -> None:
    index, users, vectors = filled_index(200, hnsw(keep_vectors=False, rebuild_tombstone_fraction=0.3))
    index.upsert(users[:100], unit_vectors(100, seed=9))
    assert index.stats()["vector_copy_bytes"] == 0
    for seed in range(5):
        assert_same_as_oracle(index, unit_vectors(1, seed=40 + seed)[0], 15)


def test_input_validation() -> None:
    index = AnnIndex(hnsw())
    vector = unit_vectors(1, 0)
    index.upsert(np.array([MAX_USER, 0]), unit_vectors(2, 1))
    assert MAX_USER in index and 0 in index
    with pytest.raises(ValueError):
        index.upsert([-1], vector)
    with pytest.raises(ValueError):
        index.upsert([1], vector * 2)
    with pytest.raises(ValueError):
        index.upsert([1], np.full((1, DIM), np.nan, dtype=np.float32))
    with pytest.raises(ValueError):
        index.upsert([1, 2], vector)
    with pytest.raises(ValueError):
        index.upsert(np.array([2**63], dtype=np.uint64), vector)
    with pytest.raises(TypeError):
        index.upsert(np.array([1.5]), vector)
    with pytest.raises(ValueError):
        index.search(vector[0][:10], 3)
    with pytest.raises(ValueError):
        AnnConfig(quantization="pq")  # type: ignore[arg-type]


def test_snapshot_roundtrip(tmp_path: Path) -> None:
    for config in (hnsw(rebuild_tombstone_fraction=0.9), hnsw(quantization="sq8", keep_vectors=False)):
        index, users, vectors = filled_index(300, config)
        index.upsert(users[:40], unit_vectors(40, seed=11))
        index.delete(users[40:60])
        watermark = {"embeddings": {"0": 1234, "1": 99}, "note": "after batch 7"}
        folder = tmp_path / config.quantization
        written = index.snapshot(folder, watermark)
        assert json.loads((written / "manifest.json").read_text())["watermark"] == watermark
        loaded, loaded_watermark = AnnIndex.load(folder)
        assert loaded_watermark == watermark
        assert loaded.config == config and len(loaded) == len(index) and loaded.tombstones == index.tombstones
        np.testing.assert_array_equal(np.sort(loaded.users()), np.sort(index.users()))
        for seed in range(5):
            query = unit_vectors(1, seed=70 + seed)[0]
            assert loaded.search(query, 20, exclude={int(users[100])}) == index.search(
                query, 20, exclude={int(users[100])}
            )
        # The loaded index keeps working: replacement and delete on top of the restored tombstones.
        loaded.upsert(users[60:70], unit_vectors(10, seed=12))
        loaded.delete(users[70:75])
        assert_valid_results(loaded, vectors[65], loaded.search(vectors[65], 30), 30)


def test_load_without_snapshot_and_with_a_new_config(tmp_path: Path) -> None:
    empty, watermark = AnnIndex.load(tmp_path / "nothing-here", hnsw(m=16))
    assert len(empty) == 0 and watermark == {} and empty.config.m == 16
    empty.snapshot(tmp_path / "empty", {"offset": 0})
    reloaded, watermark = AnnIndex.load(tmp_path / "empty")
    assert len(reloaded) == 0 and watermark == {"offset": 0} and reloaded.config.m == 16
    reloaded.upsert([9], unit_vectors(1, seed=3))
    assert reloaded.search(unit_vectors(1, seed=3)[0], 5) == [(9, pytest.approx(1.0, abs=1e-5))]
    index, users, vectors = filled_index(200)
    index.snapshot(tmp_path, {"offset": 5})
    searched, _ = AnnIndex.load(tmp_path, hnsw(ef_search=300))
    assert searched.config.ef_search == 300 and searched.rebuilds == 0
    quantised, _ = AnnIndex.load(tmp_path, hnsw(quantization="sq8"))
    assert quantised.config.quantization == "sq8" and quantised.rebuilds == 1
    assert quantised.search(vectors[3], 1)[0][0] == users[3]


def test_interrupted_snapshot_leaves_the_previous_one_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index, users, vectors = filled_index(200)
    index.snapshot(tmp_path, {"offset": 1})
    expected = index.search(vectors[0], 10)
    index.upsert(users[:50], unit_vectors(50, seed=13))  # the state a failed snapshot would have captured

    def crash_after_partial_manifest(path: Path, manifest: dict) -> None:
        path.write_text('{"format": 1, "generat')  # torn write, then the process dies
        raise OSError("disk gone")

    monkeypatch.setattr(ann, "_write_manifest", crash_after_partial_manifest)
    with pytest.raises(OSError):
        index.snapshot(tmp_path, {"offset": 2})
    monkeypatch.undo()

    def crash_at_commit(source: object, target: object) -> None:
        raise OSError("killed before rename")

    monkeypatch.setattr(ann.os, "rename", crash_at_commit)
    with pytest.raises(OSError):
        index.snapshot(tmp_path, {"offset": 3})
    monkeypatch.undo()

    loaded, watermark = AnnIndex.load(tmp_path)
    assert watermark == {"offset": 1}
    assert loaded.search(vectors[0], 10) == expected

    # A real crash runs no clean-up: leftover temporary folders, and a newer generation whose files are torn.
    debris = tmp_path / (ann.TEMP_PREFIX + "000000000009-dead")
    debris.mkdir()
    (debris / ann.INDEX_FILE).write_bytes(b"partial")
    good = ann._generations(tmp_path)[-1][1]
    torn = tmp_path / f"{ann.SNAPSHOT_PREFIX}{999:012d}"
    torn.mkdir()
    for name in (ann.MANIFEST_FILE, ann.STATE_FILE):
        (torn / name).write_bytes((good / name).read_bytes())
    index_bytes = (good / ann.INDEX_FILE).read_bytes()
    (torn / ann.INDEX_FILE).write_bytes(index_bytes[: len(index_bytes) // 2])
    loaded, watermark = AnnIndex.load(tmp_path)
    assert watermark == {"offset": 1} and loaded.search(vectors[0], 10) == expected

    # The next snapshot succeeds, becomes the one loaded, and clears the debris and older generations.
    written = index.snapshot(tmp_path, {"offset": 4})
    assert [path for _, path in ann._generations(tmp_path)] == [written]
    assert not list(tmp_path.glob(ann.TEMP_PREFIX + "*"))
    loaded, watermark = AnnIndex.load(tmp_path)
    assert watermark == {"offset": 4}
    assert loaded.search(vectors[0], 10) == index.search(vectors[0], 10)


def test_watermark_must_be_json(tmp_path: Path) -> None:
    index, _, _ = filled_index(5)
    with pytest.raises(TypeError):
        index.snapshot(tmp_path, {"offset": object()})
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ property test

USER_POOL = [*range(60), 2**31, 2**40 + 7, 2**62, MAX_USER - 1, MAX_USER]  # ids need not be contiguous or small

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("upsert"), st.lists(st.sampled_from(USER_POOL), min_size=1, max_size=20), st.integers(0, 2**16)
        ),
        st.tuples(st.just("delete"), st.lists(st.sampled_from(USER_POOL), min_size=1, max_size=8), st.just(0)),
        st.tuples(
            st.just("search"),
            st.lists(st.sampled_from(USER_POOL), max_size=30),  # exclusions
            st.integers(0, 2**16),  # picks the query (an old vector when there are any) and k
        ),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=operations,
    quantization=st.sampled_from(["flat", "sq8"]),
    fraction=st.sampled_from([0.2, 0.5, 1.0]),
    keep_vectors=st.booleans(),
)
def test_random_streams_match_brute_force(
    ops: list[tuple[str, list[int], int]], quantization: str, fraction: float, keep_vectors: bool
) -> None:
    if quantization == "sq8":
        keep_vectors = True  # without the float copy SQ8 scores are approximate by design (tested above)
    index = AnnIndex(
        hnsw(quantization=quantization, rebuild_tombstone_fraction=fraction, keep_vectors=keep_vectors)  # type: ignore[arg-type]
    )
    current: dict[int, np.ndarray] = {}  # the model: each live user's current vector
    past_vectors: list[np.ndarray] = []  # every vector ever added, the dangerous queries
    for kind, users, seed in ops:
        if kind == "upsert":
            vectors = unit_vectors(len(users), seed)
            index.upsert(np.array(users, dtype=np.int64), vectors)
            for user, vector in zip(users, vectors, strict=True):
                current[user] = vector
            past_vectors.extend(vectors)
        elif kind == "delete":
            index.delete(users)
            for user in users:
                current.pop(user, None)
        else:
            k = 1 + seed % 12
            query = past_vectors[seed % len(past_vectors)] if past_vectors and seed % 3 else unit_vectors(1, seed)[0]
            exclude = set(users)
            results = index.search(query, k, exclude=exclude)
            eligible = {user: vector for user, vector in current.items() if user not in exclude}
            oracle = sorted((float(vector @ query) for vector in eligible.values()), reverse=True)[:k]
            assert len(results) == len(oracle)
            for user, score in results:
                assert user in eligible
                assert score == pytest.approx(float(eligible[user] @ query), abs=1e-5)
            np.testing.assert_allclose([score for _, score in results], oracle, atol=1e-5)
            batch_users, batch_scores = index.search_batch(query, k)
            kept = batch_users[0] >= 0
            assert int(kept.sum()) == min(k, len(current))
            for user, score in zip(batch_users[0][kept].tolist(), batch_scores[0][kept].tolist(), strict=True):
                assert score == pytest.approx(float(current[user] @ query), abs=1e-5)
        assert len(index) == len(current)
        assert set(index.users().tolist()) == set(current)
        assert index.tombstones < max(1, fraction * index.n_slots) or fraction == 1.0
        for user, vector in current.items():
            np.testing.assert_array_equal(index.get(user), vector)


def test_memory_bytes_counts_the_codes_and_links_faiss_holds() -> None:
    index, _, _ = filled_index(300)
    parts = index.memory_bytes()
    assert parts["slots"] == 300
    assert parts["faiss_codes"] == 300 * DIM * 4  # flat float32 codes, one per slot
    # every slot has at least the 2·m level-0 link entries (int32)
    assert parts["faiss_links"] >= 300 * 2 * index.config.m * 4
    assert parts["numpy_copies"] >= 300 * DIM * 4  # the float copy kept for exact re-scoring


def test_scores_do_not_depend_on_the_order_vectors_were_inserted_in() -> None:
    """Two workers hold the same vectors in differently numbered slots (one took a partition over, one rebuilt):
    a user's neighbours and their scores must agree to the bit, through HNSW and through brute force. With
    BLAS's matrix-vector product they differed by a few ulps (its rounding depends on a row's position)."""
    rng = np.random.default_rng(7)
    vectors = unit_vectors(301, seed=7)
    users = np.arange(301, dtype=np.int64) * 3
    first, second = AnnIndex(hnsw(ef_search=64)), AnnIndex(hnsw(ef_search=64))
    first.upsert(users, vectors)
    order = rng.permutation(301)
    for chunk in np.array_split(order, 7):
        second.upsert(users[chunk], vectors[chunk])
    second.upsert(users[order[:40]], vectors[order[:40]])  # replaced with themselves: tombstones, new slots
    for user in users[:60]:  # k past the users: every one comes back, so only the scores can differ
        query = first.get(int(user))
        assert first.search(query, 500, exclude=[int(user)]) == second.search(query, 500, exclude=[int(user)])
        assert first.exact_search(query, 50) == second.exact_search(query, 50)


def test_a_rebuild_built_off_the_owner_thread_keeps_what_changed_meanwhile() -> None:
    """begin_rebuild copies the live vectors, build_graph builds from the copy (on a thread in the worker), and
    finish_rebuild swaps the graph in and applies the upserts and deletions made in between: the index then
    answers as one built from the final vectors."""
    n = 400
    users = np.arange(n, dtype=np.int64) * 5 + 1
    vectors = unit_vectors(n, seed=3)
    index = AnnIndex(hnsw(ef_search=64, rebuild_tombstone_fraction=0.2))
    index.rebuild_in_background = True
    index.upsert(users, vectors)
    replaced = unit_vectors(120, seed=4)
    index.upsert(users[:120], replaced)  # 120 tombstones of 520 slots: due, but not rebuilt inline
    assert index.rebuild_due() and index.tombstones == 120 and index.rebuilds == 0
    final = {int(u): v for u, v in zip(users, vectors, strict=True)}
    final.update({int(u): v for u, v in zip(users[:120], replaced, strict=True)})

    pending = index.begin_rebuild()
    assert not index.rebuild_due()  # one at a time
    moved = unit_vectors(10, seed=5)
    index.upsert(users[200:210], moved)  # changed while the graph is built
    index.delete(users[300:305])
    newcomer = unit_vectors(1, seed=6)
    index.upsert(np.array([9_999_999]), newcomer)
    graph = AnnIndex.build_graph(pending)
    index.upsert(users[210:212], moved[:2])  # changed after the build, before the swap
    index.finish_rebuild(pending, graph)
    final.update({int(u): v for u, v in zip(users[200:210], moved, strict=True)})
    final.update({int(u): v for u, v in zip(users[210:212], moved[:2], strict=True)})
    for user in users[300:305]:
        del final[int(user)]
    final[9_999_999] = newcomer[0]

    assert index.rebuilds == 1 and index.tombstones == 12 + 5  # replaced and deleted in between
    fresh = AnnIndex(hnsw(ef_search=64))
    fresh.upsert(np.array(list(final), dtype=np.int64), np.stack(list(final.values())))
    assert sorted(index.users().tolist()) == sorted(final)
    for user in [1, 1001, 1051, 9_999_999]:
        np.testing.assert_array_equal(index.get(user), final[user])
        assert index.search(final[user], 1000) == fresh.search(final[user], 1000)
    assert index.get(int(users[300])) is None


def test_a_rebuild_abandoned_or_overtaken_by_a_reconfiguration_leaves_the_index_whole() -> None:
    users = np.arange(50, dtype=np.int64)
    index = AnnIndex(hnsw(ef_search=64))
    index.rebuild_in_background = True
    index.upsert(users, unit_vectors(50, seed=8))
    index.upsert(users[:20], unit_vectors(20, seed=9))
    pending = index.begin_rebuild()
    index.abandon_rebuild()
    assert index.rebuild_due() and len(index) == 50
    pending = index.begin_rebuild()
    index.reconfigure(hnsw(ef_search=64, m=16))  # a new graph now, from the current vectors
    index.finish_rebuild(pending, AnnIndex.build_graph(pending))  # stale: ignored
    assert index.config.m == 16 and len(index) == 50 and index.tombstones == 0


def test_small_indexes_are_searched_by_brute_force_which_is_the_exact_top_k() -> None:
    # beam × exact_search_factor ≥ the eligible users: the exact answer (ties by id), not the graph's
    index, users, vectors = filled_index(500, AnnConfig(ef_search=16, exact_search_factor=64))
    excluded = users[:20].tolist()
    for row in range(20, 60, 5):
        assert index.search(vectors[row], 100, excluded) == index.exact_search(vectors[row], 100, excluded)
    assert index.brute_force_searches == 8 and index.stats()["brute_force_searches"] == 8
    batch_users, batch_scores = index.search_batch(vectors[:3], 10)
    for row in range(3):
        exact = index.exact_search(vectors[row], 10)
        assert batch_users[row].tolist() == [user for user, _ in exact]
        np.testing.assert_allclose(batch_scores[row], [score for _, score in exact], rtol=1e-6)
    assert index.brute_force_searches == 11
    # past the rule (16 × 8 < 500): the graph
    walked, _, _ = filled_index(500, AnnConfig(ef_search=16, exact_search_factor=8))
    walked.search(vectors[0], 10)
    assert walked.brute_force_searches == 0
    # without the kept float vectors brute force would decode every vector: always the graph
    decoded, _, _ = filled_index(200, AnnConfig(quantization="sq8", keep_vectors=False))
    decoded.search(vectors[0], 10)
    assert decoded.brute_force_searches == 0
    with pytest.raises(ValueError, match="exact_search_factor"):
        AnnConfig(exact_search_factor=-1)
