"""Deterministic neighbour sampling and the sampled 2-hop mini-graphs that GraphSAGE runs on.

Sampling is *bottom-k by hash*: each neighbour ``v`` of ``u`` gets the key ``mix(mix(salt, u), v)`` (a
splitmix64 bijection) and the ``fanout`` neighbours with the smallest keys are the sample. That is a
uniform sample without replacement, and it depends only on (salt, u, the neighbour *set*): not on the
order the store returns neighbours in, not on the batch, not on the process. So a worker that re-embeds a
user after a crash samples the same mini-graph, and a node reached twice in one batch is sampled once.
A node's sample is also a prefix of its sample at a larger fanout. It is vectorised with numpy over every
neighbour list of a hop at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import numpy as np

DEFAULT_FANOUT = 10

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class NeighbourSource(Protocol):
    """Current neighbours of a user (any order: sampling does not depend on it)."""

    def neighbours(self, user: int) -> Collection[int]: ...


# A fetch returns, for an array of nodes, each node's neighbour count and all neighbour lists concatenated.
NeighbourFetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 (a bijection with good avalanche; wraps modulo 2^64 by design)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _as_uint64(values: np.ndarray | Sequence[int] | int) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=np.int64)).view(np.uint64)


def bottom_k(owners: np.ndarray, lengths: np.ndarray, flat_neighbours: np.ndarray, salt: int, fanout: int,
             keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample up to ``fanout`` neighbours of each owner, uniformly without replacement.

    ``flat_neighbours`` holds the owners' neighbour lists one after another (``lengths`` each); ``keep``
    (optional, one bool per entry) drops entries before sampling. Returns ``(sampled, counts)``: an int64
    ``[len(owners), fanout]`` matrix whose first ``counts[i]`` entries of row ``i`` are the sample in key
    order (a canonical order: float sums over it are reproducible); the rest of the row is ``-1``.
    """
    owners = np.asarray(owners, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    flat = np.asarray(flat_neighbours, dtype=np.int64)
    n = owners.shape[0]
    segment = np.repeat(np.arange(n, dtype=np.int64), lengths)
    if keep is not None:
        segment, flat = segment[keep], flat[keep]
    sampled = np.full((n, fanout), -1, dtype=np.int64)
    counts = np.minimum(np.bincount(segment, minlength=n), fanout).astype(np.int64)
    if flat.shape[0] == 0 or fanout == 0:
        return sampled, counts
    owner_key = mix64(mix64(_as_uint64(salt)) ^ owners.view(np.uint64))
    keys = mix64(owner_key[segment] ^ flat.view(np.uint64))
    order = np.lexsort((keys, segment))  # by owner, then by key
    segment, flat = segment[order], flat[order]
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(segment, minlength=n), out=starts[1:])
    rank = np.arange(segment.shape[0], dtype=np.int64) - starts[segment]
    chosen = rank < fanout
    sampled[segment[chosen], rank[chosen]] = flat[chosen]
    return sampled, counts


def sample_neighbours(user: int, neighbours: Collection[int], fanout: int = DEFAULT_FANOUT,
                      salt: int = 0) -> list[int]:
    """Up to ``fanout`` of ``neighbours`` (uniform, without replacement), a function of (salt, user, the
    neighbour set) only."""
    flat = np.fromiter(neighbours, dtype=np.int64, count=len(neighbours))
    sampled, counts = bottom_k(np.array([user]), np.array([flat.shape[0]]), flat, salt, fanout)
    return sampled[0, :counts[0]].tolist()


class NeighbourArraySource(Protocol):
    """Current neighbours of a user as an int64 array (any order), e.g. one the store keeps between changes."""

    def neighbour_array(self, user: int) -> np.ndarray: ...


def fetch_from_source(graph: NeighbourSource) -> NeighbourFetch:
    """A :data:`NeighbourFetch` that asks ``graph`` for each node's neighbours: as arrays when it offers
    ``neighbour_array`` (:class:`NeighbourArraySource`; no Python object per neighbour), else as collections."""
    arrays = getattr(graph, "neighbour_array", None)
    if arrays is not None:

        def fetch_arrays(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            held = list(map(arrays, nodes.tolist()))
            lengths = np.fromiter(map(len, held), dtype=np.int64, count=len(held))
            flat = np.concatenate(held).astype(np.int64, copy=False) if held else np.zeros(0, dtype=np.int64)
            return lengths, flat

        return fetch_arrays

    def fetch(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lists = [graph.neighbours(node) for node in nodes.tolist()]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
        return lengths, flat

    return fetch


@dataclass(frozen=True)
class SampledSubgraph:
    """A sampled L-hop mini-graph around some root nodes (the only nodes a forward pass touches).

    ``node_ids`` lists the roots first (hop 0, in the given order), then the nodes first reached at hop 1,
    then hop 2, ...; ``hop_offsets[h]`` is where hop ``h`` starts (``hop_offsets[-1] == len(node_ids)``).
    Nodes of hops ``< L`` have a neighbour sample: row ``i`` of ``neighbour_index`` holds local indices
    (into ``node_ids``) of node ``i``'s sampled neighbours, ``neighbour_count[i]`` of them, padded with -1.
    """

    node_ids: np.ndarray  # int64 [num_nodes]
    hop_offsets: tuple[int, ...]  # len L + 2
    neighbour_index: np.ndarray  # int64 [hop_offsets[L], max fanout]
    neighbour_count: np.ndarray  # int64 [hop_offsets[L]]

    @property
    def num_roots(self) -> int:
        return self.hop_offsets[1]

    @property
    def num_nodes(self) -> int:
        return int(self.node_ids.shape[0])


def sample_subgraph(roots: np.ndarray, fetch: NeighbourFetch, fanouts: Sequence[int], salt: int,
                    exclude: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
                    ) -> SampledSubgraph:
    """Expand unique ``roots`` by ``len(fanouts)`` hops of sampling (``fanouts[h]`` neighbours per node
    first reached at hop ``h``). ``exclude(owners, lengths, flat)``, if given, returns a keep-mask over the
    fetched entries (training uses it to hide the batch's own positive edges)."""
    roots = np.asarray(roots, dtype=np.int64)
    if np.unique(roots).shape[0] != roots.shape[0]:
        raise ValueError("roots must be unique")
    max_fanout = max(fanouts) if fanouts else 0
    node_chunks = [roots]
    offsets = [0, int(roots.shape[0])]
    sampled_chunks: list[np.ndarray] = []
    count_chunks: list[np.ndarray] = []
    known = roots
    frontier = roots
    for fanout in fanouts:
        lengths, flat = fetch(frontier)
        keep = exclude(frontier, lengths, flat) if exclude is not None else None
        sampled, counts = bottom_k(frontier, lengths, flat, salt, fanout, keep)
        if fanout < max_fanout:
            sampled = np.pad(sampled, ((0, 0), (0, max_fanout - fanout)), constant_values=-1)
        sampled_chunks.append(sampled)
        count_chunks.append(counts)
        reached = np.unique(sampled[sampled_count_mask(counts, sampled.shape[1])])
        frontier = reached[~np.isin(reached, known, assume_unique=True)]
        node_chunks.append(frontier)
        known = np.concatenate([known, frontier])
        offsets.append(offsets[-1] + int(frontier.shape[0]))
    node_ids = np.concatenate(node_chunks)
    sampled_ids = np.concatenate(sampled_chunks) if sampled_chunks else np.zeros((0, 0), dtype=np.int64)
    counts = np.concatenate(count_chunks) if count_chunks else np.zeros(0, dtype=np.int64)
    return SampledSubgraph(node_ids, tuple(offsets), local_indices(node_ids, sampled_ids, counts), counts)


def sampled_count_mask(counts: np.ndarray, width: int) -> np.ndarray:
    """Bool ``[len(counts), width]``: True at the filled entries of a padded neighbour matrix."""
    return np.arange(width)[None, :] < counts[:, None]


def local_indices(node_ids: np.ndarray, sampled_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Node ids of a padded neighbour matrix → positions in ``node_ids`` (padding stays -1)."""
    order = np.argsort(node_ids, kind="stable")
    filled = sampled_count_mask(counts, sampled_ids.shape[1])
    index = np.full(sampled_ids.shape, -1, dtype=np.int64)
    index[filled] = order[np.searchsorted(node_ids[order], sampled_ids[filled])]
    return index
