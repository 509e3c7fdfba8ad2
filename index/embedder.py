"""Stream-time user embeddings: sample each user's 2-hop mini-graph from the live graph, encode its nodes'
features, run GraphSAGE in eval mode.

Deterministic: sampling is a function of (salt, user, neighbour sets) (see :mod:`pymk.index.sampling`) and
the model's arithmetic does not depend on the batch, so the same graph state and salt give the same bytes,
e.g. when a worker re-processes an event after a crash. Pass the same salt for every user of a model
version (:func:`salt_for_version`), or one per user.

Fast: per batch the only Python loops are one ``neighbours`` call per sampled node (an array per node when the
graph offers ``neighbour_array``) and one profile lookup per node (none when the feature source reads a batch's
profiles and degrees at once, ``profiles_and_degrees``); profile encodings are cached in an LRU (by
``(user, profile_version(user))`` when the feature source offers ``profile_version``, else by the profile value,
and for batch reads first by the profile object's identity), degree features are vectorised. ``threads`` sets
torch's threads for the forward pass (the worker uses one: its batches are small and its cores shared).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from pymk.events import Profile
from pymk.index.node_features import (
    DEGREE_SLICE,
    NODE_FEATURE_DIM,
    NodeFeatureSource,
    encode_degrees,
    encode_profile_part,
    stable_hash64,
)
from pymk.index.sage import GraphSage, make_batch
from pymk.index.sampling import NeighbourSource, fetch_from_source, sample_subgraph

_NO_PROFILE = encode_profile_part(None)
_NO_PROFILE.setflags(write=False)


def salt_for_version(version: str) -> int:
    """A sampling salt (int64) from an embedding/model version string."""
    return int(np.array(stable_hash64("salt", version), dtype=np.uint64).view(np.int64))


class Embedder:
    """Embeds users of a live graph with a trained :class:`GraphSage` (switched to eval mode)."""

    def __init__(self, model: GraphSage, features: NodeFeatureSource, graph: NeighbourSource, *,
                 batch_size: int = 1024, cache_size: int = 200_000,
                 cache: OrderedDict[Hashable, np.ndarray] | None = None, threads: int | None = None) -> None:
        self.model = model.eval()
        # torch threads for a forward pass (None: torch's setting). A worker's batches are small (a few to a
        # few hundred roots) and its cores are shared: with 2 threads on 2 busy cores a 16-root batch took
        # ~8x the CPU of 1 thread (the threads spin-wait for each other), see docs/benchmarks.md
        self.threads = threads
        self.features = features
        self.graph = graph
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._fetch = fetch_from_source(graph)
        # profile encodings (a function of the profile alone): ``cache`` lets the embedders of one worker's
        # partitions share one LRU instead of each holding up to ``cache_size`` copies of the same users
        self._cache: OrderedDict[Hashable, np.ndarray] = OrderedDict() if cache is None else cache
        self._profile_version = getattr(features, "profile_version", None)
        # a source that reads a batch's profiles and degrees at once (the worker's fact slots)
        self._profiles_and_degrees = getattr(features, "profiles_and_degrees", None)
        self._by_identity: dict[int, tuple[Profile, np.ndarray]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def version(self) -> str | None:
        """The model version (embeddings of different versions are not comparable)."""
        return self.model.version

    @property
    def embedding_dim(self) -> int:
        return self.model.config.embedding_dim

    def embed(self, users: Sequence[int] | np.ndarray, salt: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """float32 ``[len(users), embedding_dim]``, unit rows; ``salt`` is one int for all or one per user."""
        user_ids = np.asarray(users, dtype=np.int64).reshape(-1)
        salts = np.broadcast_to(np.asarray(salt, dtype=np.int64), user_ids.shape)
        out = np.empty((user_ids.shape[0], self.embedding_dim), dtype=np.float32)
        self.model.eval()
        previous_threads = torch.get_num_threads()
        if self.threads is not None and self.threads != previous_threads:
            torch.set_num_threads(self.threads)
        try:
            self._embed_into(out, user_ids, salts)
        finally:
            if torch.get_num_threads() != previous_threads:
                torch.set_num_threads(previous_threads)
        return out

    def _embed_into(self, out: np.ndarray, user_ids: np.ndarray, salts: np.ndarray) -> None:
        for salt_value in np.unique(salts):
            rows = np.flatnonzero(salts == salt_value)
            unique_users, inverse = np.unique(user_ids[rows], return_inverse=True)
            vectors = np.empty((unique_users.shape[0], self.embedding_dim), dtype=np.float32)
            for start in range(0, unique_users.shape[0], self.batch_size):
                chunk = unique_users[start:start + self.batch_size]
                vectors[start:start + chunk.shape[0]] = self._embed_unique(chunk, int(salt_value))
            out[rows] = vectors[inverse]

    def _embed_unique(self, roots: np.ndarray, salt: int) -> np.ndarray:
        subgraph = sample_subgraph(roots, self._fetch, self.model.config.fanout, salt)
        batch = make_batch(subgraph, self.node_features(subgraph.node_ids), self.model.config.identity_dim)
        with torch.inference_mode():
            return self.model(batch).numpy()

    # ---- features ------------------------------------------------------------------------------------------
    def node_features(self, node_ids: np.ndarray) -> np.ndarray:
        """float32 ``[n, NODE_FEATURE_DIM]``: equal to ``encode_node(profile, degree)`` row by row."""
        ids = node_ids.tolist()
        if not ids:
            return np.zeros((0, NODE_FEATURE_DIM), dtype=np.float32)
        if self._profiles_and_degrees is not None:
            profiles, degrees = self._profiles_and_degrees(np.asarray(node_ids, dtype=np.int64))
            x = np.stack(list(map(self._encoded_profile, profiles)))
        else:
            x = np.stack([self._profile_part(user) for user in ids])
            degree = self.features.degree
            degrees = np.fromiter((degree(user) for user in ids), dtype=np.int64, count=len(ids))
        x[:, DEGREE_SLICE] = encode_degrees(degrees)
        return x

    def _encoded_profile(self, profile: Profile | None) -> np.ndarray:
        """The encoding of a profile read in bulk: first by the object's identity (a source that keeps its
        profiles hands out the same object until it changes; the entry holds the object, so its id is not
        reused while the entry lives), then by value as :meth:`_profile_part` does."""
        if profile is None:
            return _NO_PROFILE
        held = self._by_identity.get(id(profile))
        if held is not None and held[0] is profile:
            return held[1]
        encoded = self._cache.get(profile)
        if encoded is None:
            self.cache_misses += 1
            encoded = encode_profile_part(profile)
            encoded.setflags(write=False)
            self._cache[profile] = encoded
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self.cache_hits += 1
            self._cache.move_to_end(profile)
        if len(self._by_identity) >= self.cache_size:
            self._by_identity.clear()  # rare (more distinct profile objects than the cache holds): start over
        self._by_identity[id(profile)] = (profile, encoded)
        return encoded

    def _profile_part(self, user: int) -> np.ndarray:
        profile: Profile | None = None
        if self._profile_version is not None:
            key: Hashable = (user, self._profile_version(user))
        else:
            profile = self.features.profile(user)
            if profile is None:
                return _NO_PROFILE
            key = profile  # frozen dataclass: equal profiles share one encoding
        cached = self._cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return cached
        self.cache_misses += 1
        if self._profile_version is not None:
            profile = self.features.profile(user)
        encoded = encode_profile_part(profile)
        encoded.setflags(write=False)
        self._cache[key] = encoded
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return encoded

    def clear_cache(self) -> None:
        self._cache.clear()
        self._by_identity.clear()
