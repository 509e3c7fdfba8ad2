"""An in-memory graph with profiles: the :class:`NeighbourSource` and :class:`NodeFeatureSource` of
training, tests and offline evaluation (the worker implements both over its RocksDB state)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping

from pymk.events import Profile

_EMPTY: frozenset[int] = frozenset()


class AdjacencyGraph:
    """Undirected simple graph as an adjacency dict of sets, plus an optional profile per user."""

    def __init__(self, edges: Iterable[tuple[int, int]] = (), profiles: Mapping[int, Profile] | None = None) -> None:
        self._adjacency: dict[int, set[int]] = {}
        self._profiles: dict[int, Profile] = dict(profiles or {})
        self._edges = 0
        for u, v in edges:
            self.add_edge(u, v)

    @classmethod
    def from_connections(cls, connections: Iterable[tuple[int, int, int]],
                         profiles: Mapping[int, Profile] | None = None,
                         before_ts: int | None = None) -> AdjacencyGraph:
        """The graph of ``(u, v, ts)`` connections, only those with ``ts < before_ts`` when given."""
        return cls(((u, v) for u, v, ts in connections if before_ts is None or ts < before_ts), profiles)

    # ---- updates -------------------------------------------------------------------------------------------
    def add_edge(self, u: int, v: int) -> bool:
        """Connect u and v (self-loops ignored); True when the edge is new."""
        if u == v:
            return False
        neighbours_u = self._adjacency.setdefault(u, set())
        if v in neighbours_u:
            return False
        neighbours_u.add(v)
        self._adjacency.setdefault(v, set()).add(u)
        self._edges += 1
        return True

    def remove_edge(self, u: int, v: int) -> bool:
        if v not in self._adjacency.get(u, _EMPTY):
            return False
        self._adjacency[u].discard(v)
        self._adjacency[v].discard(u)
        self._edges -= 1
        return True

    def set_profile(self, user: int, profile: Profile | None) -> None:
        if profile is None:
            self._profiles.pop(user, None)
        else:
            self._profiles[user] = profile

    # ---- NeighbourSource / NodeFeatureSource -------------------------------------------------------------
    def neighbours(self, user: int) -> Collection[int]:
        return self._adjacency.get(user, _EMPTY)

    def degree(self, user: int) -> int:
        return len(self._adjacency.get(user, _EMPTY))

    def profile(self, user: int) -> Profile | None:
        return self._profiles.get(user)

    # ---- inspection ----------------------------------------------------------------------------------------
    def has_edge(self, u: int, v: int) -> bool:
        return v in self._adjacency.get(u, _EMPTY)

    def users(self) -> Iterator[int]:
        """Every user with an edge or a profile."""
        yield from self._adjacency
        yield from (user for user in self._profiles if user not in self._adjacency)

    def edges(self) -> Iterator[tuple[int, int]]:
        """Each edge once, as (smaller, larger)."""
        for u, neighbours in self._adjacency.items():
            for v in neighbours:
                if u < v:
                    yield u, v

    @property
    def num_edges(self) -> int:
        return self._edges

    @property
    def num_users(self) -> int:
        return len(self._adjacency) + sum(1 for user in self._profiles if user not in self._adjacency)
