"""The product row of ``pymk evaluate --live``: the past is replayed through Kafka into a real worker (with the
models trained on the past), every user is re-embedded and re-ranked from the final past state (``pymk refresh
--all --reembed``), and the lists the worker publishes on the recommendations topic are what is scored.

Lists are published with k = 50 for this run (Recall@50 needs 50 items; the product's default is 20), so MRR is
truncated at depth 50 here. The same past, models and code run offline in :mod:`pymk.ranking.product`; with the
as-of rule of the worker (each partition's event-time watermark, see :func:`partition_as_of`) both modes publish
identical lists (tests/test_evaluate_live.py).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pymk.events import ConnectionEvent, Recommendations
from pymk.processes import start_worker_process, stop_process
from pymk.ranking.evaluation import EvaluationSplit
from pymk.ranking.product import ProductModels
from pymk.settings import Settings
from pymk.streams.partitioning import partition_for_user

LIVE_K = 50


class PublishedListMethod:
    """A :class:`pymk.ranking.evaluation.Method` over lists consumed from the recommendations topic."""

    def __init__(self, name: str, lists: dict[int, Recommendations]) -> None:
        self.name = name
        self.lists = lists

    def rank(self, user: int, k: int) -> list[int]:
        published = self.lists.get(user)
        return [] if published is None else [item.candidate for item in published.items[:k]]

    def best_rank(self, user: int, targets: Collection[int]) -> int | None:
        for position, candidate in enumerate(self.rank(user, LIVE_K), start=1):
            if candidate in targets:
                return position
        return None


@dataclass
class LiveResult:
    method: PublishedListMethod
    lists: dict[int, Recommendations]
    info: dict[str, Any]


def partition_as_of(connections: Sequence[tuple[int, int, int]], partitions: int) -> Callable[[int], int]:
    """The worker's as-of time for a user after replaying ``connections``: the largest ts that reached the user's
    partition (each connection reaches the partitions of both its users)."""
    watermark: dict[int, int] = {}
    for u, v, ts in connections:
        for p in {partition_for_user(u, partitions), partition_for_user(v, partitions)}:
            watermark[p] = max(watermark.get(p, 0), ts)
    return lambda user: watermark.get(partition_for_user(user, partitions), 0)


def replay_past(settings: Settings, split: EvaluationSplit, models: ProductModels, k: int = LIVE_K,
                timeout_s: float = 1800.0, log_dir: Path | None = None, reranker_dir: Path | None = None
                ) -> LiveResult:
    """``reranker_dir``: a cross-attention model the worker serves (``PYMK_RERANKER=cross-attention``), re-ranking
    each list's top 50; without it the worker serves none, whatever the environment says."""
    from pymk.kafka_broker import LocalBroker
    from pymk.streams.consumer import latest_per_user, read_recommendations
    from pymk.streams.lag import STARTUP_GRACE_S, wait_idle
    from pymk.streams.producer import event_messages, send_commands, send_messages
    from pymk.streams.topics import delete_topics_with_prefix, ensure_topics

    broker = LocalBroker(settings)
    if not broker.accepting():  # a broker already listening (tests, a running deployment) is used as it is
        broker.start(quiet=True)
    tag = "eval" + uuid.uuid4().hex[:8]
    home = Path(tempfile.mkdtemp(prefix="pymk-evaluate-"))
    live = replace(settings, topic_prefix=tag, app_id=f"{tag}-worker", home=home, web_port=settings.web_port + 23,
                   embedding_model=str(models.sage_dir), ranker_model=str(models.ranker_dir),
                   recommendations_k=k, reembed_min_interval_ms=0, recommend=True,
                   reranker="none" if reranker_dir is None else "cross-attention",
                   reranker_model="" if reranker_dir is None else str(reranker_dir))
    events = [ConnectionEvent(u, v, "add", ts) for u, v, ts in split.past_connections]
    url = f"http://{live.web_host}:{live.web_port}"
    started = time.perf_counter()
    ensure_topics(live)
    send_messages(live, event_messages(live, events), len(events), progress=False)
    log = (log_dir or home) / f"{tag}-worker.log"
    worker = start_worker_process(live, log)
    try:
        if not wait_idle(live, timeout_s=timeout_s, worker_urls=[url], startup_grace_s=STARTUP_GRACE_S):
            raise TimeoutError(f"the worker did not finish the replay in {timeout_s} s (log {log})")
        replayed = time.perf_counter()
        # every user embedded from the final past state, then every list ranked with all the final vectors
        for reembed in (True, False):
            send_commands(live, reembed=reembed, rank=not reembed)
            time.sleep(2.0)
            if not wait_idle(live, timeout_s=timeout_s, worker_urls=[url]):
                raise TimeoutError(f"the worker did not finish the refresh in {timeout_s} s (log {log})")
        lists = latest_per_user(read_recommendations(live))
    finally:
        stop_process(worker)
        delete_topics_with_prefix(live, tag + ".")
        shutil.rmtree(home, ignore_errors=True)
    info = {"events_replayed": len(events), "lists_consumed": len(lists), "k": k,
            "replay_seconds": round(replayed - started, 1),
            "refresh_seconds": round(time.perf_counter() - replayed, 1)}
    name = "hybrid+XGBoost (live)" if reranker_dir is None else "hybrid+XGBoost+cross-attention (live)"
    return LiveResult(PublishedListMethod(name, lists), lists, info)


def live_method(settings: Settings, split: EvaluationSplit, history: Any, models: ProductModels,
                reranker_dir: Path | None = None) -> LiveResult:
    return replay_past(settings, split, models, reranker_dir=reranker_dir)
