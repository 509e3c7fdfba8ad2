"""`pymk train ranker --from-stream`: learn from the product's own traffic.

Reads, from the beginning, the impressions the workers logged (what was shown, with the exact features the
model scored), the connections and the dismissals; labels each shown pair with what happened in the horizon
after it was shown (:mod:`pymk.ranking.stream_labels`); trains XGBoost with the seed's defaults on a time split
(validation = the latest impressions); and publishes the model as a new version under
``<home>/models/ranker/`` — running workers with that home load it within ``model_reload_interval_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from pymk.events import UNSHOWN_KIND, ConnectionEvent, DismissalEvent, Impression, unshown_sample_from_json
from pymk.ranking.model import Ranker, roc_auc
from pymk.ranking.stream_labels import feature_matrix, label_impressions, pool_weights, recall_at_k, time_split
from pymk.settings import Settings
from pymk.validation import Invalid, parse_event


def read_topic(settings: Settings, topic: str) -> Iterator[bytes]:
    """Every value of a topic, from the beginning to the end offsets seen at start."""
    consumer = KafkaConsumer(**settings.kafka_client_config(), group_id=None, enable_auto_commit=False,
                             client_id="pymk-train-from-stream", max_partition_fetch_bytes=8 * 1024 * 1024)
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for records in consumer.poll(timeout_ms=1000, max_records=50_000).values():
                for record in records:
                    if record.value is not None and record.offset < end[TopicPartition(record.topic,
                                                                                     record.partition)]:
                        yield record.value
    finally:
        consumer.close()


def _events(settings: Settings, kind: str, now_ms: int, keep: Callable[[Any], bool]) -> list[Any]:
    out = []
    for raw in read_topic(settings, settings.topic(kind)):
        event = parse_event(kind, raw, now_ms, max_bytes=settings.max_message_bytes,
                            max_future_ms=settings.max_future_ms)
        if not isinstance(event, Invalid) and keep(event):
            out.append(event)
    return out


def serving_ranker(settings: Settings) -> Ranker | None:
    """The XGBoost model the workers serve now (None when they rank with the heuristic)."""
    from pymk.streams.models import resolve_model

    path = resolve_model(settings.ranker_model, settings.model_dir, "ranker")
    if path is None:
        return None
    try:
        return Ranker.load(path)
    except ValueError:  # trained on other features: start afresh
        return None


def train_from_stream(settings: Settings, out: Path | None = None, val_fraction: float = 0.2,
                      publish: bool = True, warm_start: bool = True) -> dict[str, Any]:
    """Train on the labelled impressions. ``warm_start``: continue boosting from the serving model, so a few
    thousand labels from one period correct it rather than replace what it learned from far more data (a
    model trained on the stream alone scored below the cold-start model in the loop test)."""
    from pymk.ranking.heuristic import HeuristicScorer
    from pymk.ranking.model_store import TrainingRefused, check_split_classes, point_current, promotion

    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    impressions = [Impression.from_json(raw) for raw in read_topic(settings, settings.topic("impressions"))]
    for raw in read_topic(settings, settings.topic(UNSHOWN_KIND)):
        impressions.extend(unshown_sample_from_json(raw))
    connections = [(e.src, e.dst, e.action, e.ts) for e in
                   _events(settings, "connections", now_ms, lambda e: isinstance(e, ConnectionEvent))]
    dismissals = [(e.user, e.candidate, e.ts) for e in
                  _events(settings, "dismissals", now_ms, lambda e: isinstance(e, DismissalEvent))]
    event_time = max([ts for *_, ts in connections] + [ts for *_, ts in dismissals] +
                     [i.as_of for i in impressions] + [0])
    rows = label_impressions(impressions, connections, dismissals, settings.label_horizon_ms, event_time)
    advice = (f"let the workers serve longer (an impression is labelled {settings.label_horizon_ms} ms of event "
              "time after it was shown, PYMK_LABEL_HORIZON_MS)")
    if not rows:
        raise TrainingRefused(f"no labelled impressions yet ({len(impressions)} impressions): {advice}")
    features = feature_matrix(rows)
    labels = np.array([r.label for r in rows], dtype=np.float32)
    train, val = time_split(rows, val_fraction)
    check_split_classes(labels[train], labels[val], f"{len(rows)} labelled impressions", advice)
    outcomes = {name: sum(1 for r in rows if r.outcome == name) for name in ("connected", "dismissed", "expired")}
    served_versions = sorted({r.impression.model_version for r in rows})
    weights = pool_weights(rows)
    base = serving_ranker(settings) if warm_start else None
    ranker = Ranker.train(features[train], labels[train], features[val], labels[val], weights=weights[train],
                          val_weights=weights[val], extra_metadata={
        "data": "stream", "label_horizon_ms": settings.label_horizon_ms, "impressions": len(impressions),
        "labelled": len(rows), "outcomes": outcomes, "trained_on_traffic_of": served_versions}, base=base)
    val_rows = [r for r, v in zip(rows, val, strict=True) if v]
    logged = np.array([r.impression.score for r in val_rows])
    new = ranker.predict(features[val])
    # the model serving now, on the same held-out rows (the logged scores may be older models')
    serving = base if base is not None else serving_ranker(settings) or HeuristicScorer()
    serving_scores = np.asarray(serving.predict(features[val]), dtype=np.float64)
    new_auc, serving_auc = roc_auc(labels[val], new), roc_auc(labels[val], serving_scores)
    new_recall, serving_recall = recall_at_k(val_rows, new), recall_at_k(val_rows, serving_scores)
    promote, why = promotion(new_recall, new_auc, serving_recall, serving_auc)
    report: dict[str, Any] = {
        "version": ranker.version, "impressions": len(impressions), "labelled": len(rows), "outcomes": outcomes,
        "train_rows": int(train.sum()), "val_rows": int(val.sum()),
        "val_auc": {"new_model": new_auc, "serving_model": serving_auc,
                    "serving_model_scores": roc_auc(labels[val], logged)},
        "val_recall_at_20": {"new_model": new_recall, "serving_model": serving_recall,
                             "serving_model_scores": recall_at_k(val_rows, logged)},
        "serving_model": serving.version, "promoted": promote, "why": why,
        "trained_on_traffic_of": served_versions,
        "continued_from": base.version if base is not None else None,
        "importances": dict(sorted(ranker.feature_importances().items(), key=lambda kv: -kv[1])[:10]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if publish:
        kind_dir = out or settings.model_dir / "ranker"
        model_dir = ranker.save(kind_dir / ranker.version)
        report["model_dir"] = str(model_dir)  # saved either way; current only when promoted
        report["current"] = str(point_current(model_dir)) if promote else None
    return report
