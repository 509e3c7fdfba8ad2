"""In-process clusters of P partitions of the pure state (graph, behaviour), exchanging their outbox messages
through a queue that delivers in random order and with duplicates, as the partition-messages topic may
(at-least-once delivery). Tier-1 tests compare what they converge to with an oracle."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pymk.events import DismissalEvent, EngagementEvent, ProfileViewEvent
from pymk.features.behaviour import PartitionBehaviour
from pymk.features.graph import PartitionGraph
from pymk.features.storage import DictRowStore, RowStore

DUPLICATE_SHARE = 0.1  # of the messages delivered twice


class ShuffledDelivery:
    """The queue: :meth:`collect` takes a partition's outbox, :meth:`deliver_some` applies a random share of
    what is in flight, in random order (messages caused by it join the queue)."""

    def __init__(self, partitions: int, rng: random.Random) -> None:
        self.partitions = partitions
        self.rng = rng
        self.part: Callable[[int], int] = lambda u: (u * 2654435761) % partitions
        self.in_flight: list[tuple[int, object]] = []

    def _enqueue(self, outbox: dict[int, list[Any]]) -> None:
        for target, batch in outbox.items():
            for message in batch:
                self.in_flight.append((target, message))
                if self.rng.random() < DUPLICATE_SHARE:
                    self.in_flight.append((target, message))

    def _apply(self, target: int, message: object) -> None:
        raise NotImplementedError

    def deliver_some(self, fraction: float) -> None:
        self.rng.shuffle(self.in_flight)
        keep = int(len(self.in_flight) * (1 - fraction))
        now, self.in_flight = self.in_flight[keep:], self.in_flight[:keep]
        for target, message in now:
            self._apply(target, message)

    def drain(self) -> None:
        while self.in_flight:
            self.deliver_some(1.0)


class GraphCluster(ShuffledDelivery):
    """P :class:`PartitionGraph` s; ``degrees`` keeps the newest degree update of each user (user-globals)."""

    def __init__(self, partitions: int, rng: random.Random,
                 store_factory: Callable[[int], RowStore] | None = None, materialise_common: bool = True,
                 hub_degree: int = 0) -> None:
        super().__init__(partitions, rng)
        self.graphs = [PartitionGraph(p, partitions, store_factory(p) if store_factory else DictRowStore(),
                                      self.part, materialise_common=materialise_common, hub_degree=hub_degree)
                       for p in range(partitions)]
        self.degrees: dict[int, tuple[int, int]] = {}

    def collect(self, graph: PartitionGraph) -> None:
        messages, degrees = graph.take_outbox()
        self._enqueue(messages)
        for update in degrees:
            if update.version > self.degrees.get(update.user, (0, -1))[1]:
                self.degrees[update.user] = (update.degree, update.version)

    def _apply(self, target: int, message: object) -> None:
        self.graphs[target].apply_message(message)  # type: ignore[arg-type]
        self.collect(self.graphs[target])

    def connection(self, src: int, dst: int, action: str, ts: int) -> None:
        graph = self.graphs[self.part(src)]
        graph.apply_connection(src, dst, action, ts)
        self.collect(graph)

    def owner(self, user: int) -> PartitionGraph:
        return self.graphs[self.part(user)]

    def all_counts(self, users: range) -> list[dict[int, int]]:
        return [self.owner(u).common_neighbor_counts(u) for u in users]


class BehaviourCluster(ShuffledDelivery):
    """P :class:`PartitionBehaviour` s."""

    def __init__(self, partitions: int, rng: random.Random, max_item_fanout: int | None = None,
                 store_factory: Callable[[int], RowStore] | None = None, max_cached_rows: int = 2_000_000) -> None:
        super().__init__(partitions, rng)
        self.max_item_fanout = max_item_fanout
        self.nodes = [PartitionBehaviour(p, partitions, store_factory(p) if store_factory else DictRowStore(),
                                         self.part, max_item_fanout=max_item_fanout,
                                         max_cached_rows=max_cached_rows) for p in range(partitions)]

    def collect(self, node: PartitionBehaviour) -> None:
        outbox = node.take_outbox()
        assert node.partition not in outbox
        self._enqueue(outbox)

    def _apply(self, target: int, message: object) -> None:
        self.nodes[target].apply_message(message)  # type: ignore[arg-type]
        self.collect(self.nodes[target])

    def event(self, kind: str, user: int, other: int, ts: int) -> bool:
        node = self.nodes[self.part(user)]
        event = {"view": ProfileViewEvent, "dismiss": DismissalEvent, "engage": EngagementEvent}[kind](user, other, ts)
        changed = node.apply_event(event)
        self.collect(node)
        return changed

    def at(self, user: int) -> PartitionBehaviour:
        return self.nodes[self.part(user)]
