"""`pymk train embeddings|ranker|two-tower`: offline training from an edge list or a synthetic network. A model
that passes becomes what the workers load through the ``current`` pointer (``<home>/models/<kind>/current``,
:mod:`pymk.ranking.model_store`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pymk.datasets import load_edge_history
from pymk.events import ConnectionEvent, InputEvent, Profile, UserEvent
from pymk.features.profile import merge_profile
from pymk.ranking.model_store import TrainingRefused, point_current, promotion
from pymk.ranking.training_data import embeddings_at_checkpoint
from pymk.settings import Settings


def connections_and_profiles(events: Sequence[InputEvent]) -> tuple[list[tuple[int, int, int]], dict[int, Profile]]:
    """The connections that are alive at the end (in time order, each pair once) and every user's last profile."""
    alive: dict[tuple[int, int], tuple[int, str]] = {}
    profiles: dict[int, Profile] = {}
    for event in sorted(events, key=lambda e: e.ts):
        if isinstance(event, ConnectionEvent):
            pair = (min(event.src, event.dst), max(event.src, event.dst))
            first_ts = alive[pair][0] if pair in alive and alive[pair][1] == "add" else event.ts
            alive[pair] = (first_ts, event.action)
        elif isinstance(event, UserEvent):
            profiles[event.user] = merge_profile(profiles.get(event.user), event.profile)
    connections = sorted(((u, v, ts) for (u, v), (ts, action) in alive.items() if action == "add"),
                         key=lambda c: (c[2], c[0], c[1]))
    return connections, profiles


def training_events(data: str | None, synthetic: int | None, seed: int) -> tuple[list[InputEvent] | None, str]:
    """The events to learn from, and a description for the model's metadata."""
    if synthetic:
        from pymk.streams.producer import synthetic_events

        return synthetic_events(synthetic, seed=seed), f"synthetic:{synthetic}:seed{seed}"
    assert data is not None
    return None, str(data)


def train_embeddings_command(data: str | None, synthetic: int | None, seed: int, out: Path, epochs: int,
                             progress: bool = True) -> dict[str, object]:
    from pymk.index.training import EmbeddingTrainingConfig, train_embeddings

    events, source = training_events(data, synthetic, seed)
    if events is not None:
        connections, profiles = connections_and_profiles(events)
    else:
        connections, profiles = load_edge_history(source).connections, {}
    result = train_embeddings(connections, profiles or None, out,
                              EmbeddingTrainingConfig(epochs=epochs, progress=progress))
    current = point_current(result.model_dir)
    return {"version": result.metadata["version"], "model_dir": str(result.model_dir), "current": str(current),
            "source": source, "connections": len(connections), "profiles": len(profiles),
            "best_val_auc": result.metadata.get("best_val_auc"), "curve_png": str(result.curve_png)}


def train_ranker_command(data: str | None, synthetic: int | None, seed: int, out: Path, settings: Settings,
                         embeddings: Path | None = None, progress: bool = True) -> dict[str, object]:
    import shutil

    from pymk.ranking.training_data import TrainingDataConfig, train_ranker
    from pymk.streams.models import resolve_model

    events, source = training_events(data, synthetic, seed)
    model_dir = embeddings or resolve_model("", settings.model_dir, "embeddings")
    horizon_days = settings.label_horizon_ms / 86_400_000
    staging = out / f".training-{os.getpid()}"
    serving, serving_version = serving_scorer(settings)
    try:
        ranker = train_ranker(events if events is not None else source, staging,
                              TrainingDataConfig(horizon_days=horizon_days, seed=seed), progress=progress,
                              embeddings_at=embeddings_at_checkpoint(model_dir) if model_dir else None,
                              incumbent=serving)
    except ValueError as exc:  # the data cannot give a model (one class, no validation)
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingRefused(str(exc)) from exc
    final = out / ranker.version
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    promote, why = promotion(ranker.metadata.get("val_recall_at_20"), ranker.metadata.get("val_auc"),
                             ranker.metadata.get("incumbent_val_recall_at_20"),
                             ranker.metadata.get("incumbent_val_auc"))
    current = point_current(final) if promote else out / "current"
    return {"version": ranker.version, "model_dir": str(final), "promoted": promote, "why": why,
            "serving_model": serving_version, "current": str(current), "source": source,
            "embeddings_model": str(model_dir) if model_dir else None,
            "val_auc": ranker.metadata.get("val_auc"), "importances": ranker.feature_importances()}


def serving_scorer(settings: Settings) -> tuple[object, str]:
    """The ranker the workers serve now, to judge a new one against (the cold-start heuristic when no model is
    trained or the serving one was trained on other features), and its version."""
    from pymk.ranking.heuristic import HeuristicScorer
    from pymk.ranking.model import Ranker
    from pymk.streams.models import resolve_model

    path = resolve_model(settings.ranker_model, settings.model_dir, "ranker")
    if path is not None:
        try:
            ranker = Ranker.load(path)
            return ranker, ranker.version
        except ValueError:  # trained on other features
            pass
    heuristic = HeuristicScorer()
    return heuristic, heuristic.version


def train_two_tower_command(data: str | None, synthetic: int | None, seed: int, out: Path, settings: Settings,
                            loss: str = "B2", epochs: int = 15, progress: bool = True) -> dict[str, object]:
    from pymk.ranking.two_tower import TwoTowerConfig, train_two_tower
    from pymk.streams.models import resolve_model

    events, source = training_events(data, synthetic, seed)
    if events is not None:
        connections, profiles = connections_and_profiles(events)
    else:
        connections, profiles = load_edge_history(source).connections, {}
    sage = resolve_model(settings.embedding_model, settings.model_dir, "embeddings")
    if sage is None:
        raise FileNotFoundError("the two-tower model needs a GraphSAGE model (pymk train embeddings)")
    result = train_two_tower(connections, profiles or None, sage, out,
                             TwoTowerConfig(loss=loss, epochs=epochs, progress=progress))  # type: ignore[arg-type]
    current = point_current(result.model_dir)
    return {"version": result.metadata.get("version"), "model_dir": str(result.model_dir), "current": str(current),
            "source": source, "loss": loss, "val_auc": result.metadata.get("best_val_auc"),
            "curve_png": str(result.curve_png)}


def train_reranker_command(data: str | None, synthetic: int | None, seed: int, out: Path, settings: Settings,
                           embeddings: Path | None = None, epochs: int | None = None,
                           progress: bool = True) -> dict[str, object]:
    """``pymk train reranker``: the cross-attention re-ranker on the temporal replay, its top 50 chosen by the
    ranker the workers serve now (XGBoost, or the heuristic), embedding inputs from the serving GraphSAGE model."""
    from dataclasses import replace

    from pymk.datasets import load_edge_history
    from pymk.index.sage import load_model
    from pymk.ranking.cross_attention_training import RerankerTrainingConfig, train_reranker
    from pymk.streams.models import resolve_model

    events, source = training_events(data, synthetic, seed)
    sage_dir = embeddings or resolve_model(settings.embedding_model, settings.model_dir, "embeddings")
    scorer, scorer_version = serving_scorer(settings)
    base = RerankerTrainingConfig(seed=seed, progress=progress,
                                  horizon_days=settings.label_horizon_ms / 86_400_000)
    if epochs is not None:
        base = replace(base, epochs=epochs)
    if sage_dir is not None:
        base = replace(base, model=replace(base.model, embedding_dim=load_model(sage_dir)[0].config.embedding_dim))
    staging = out / f".training-{os.getpid()}"
    result = train_reranker(events if events is not None else load_edge_history(source), staging, base,
                            scorer,  # type: ignore[arg-type]
                            embeddings_at_checkpoint(sage_dir) if sage_dir is not None else None)
    final = out / str(result.metadata["version"])
    if final.exists():
        import shutil

        shutil.rmtree(final)
    staging.rename(final)
    current = point_current(final)
    meta = result.metadata
    return {"version": meta["version"], "model_dir": str(final), "current": str(current), "source": source,
            "stage2_model": scorer_version, "embeddings_model": str(sage_dir) if sage_dir else None,
            "val_recall_at_20": meta["val_recall_at_20"], "stage2_val_recall_at_20": meta["stage2_val_recall_at_20"],
            "best_epoch": meta["best_epoch"], "curve_png": str(final / "curve.png"),
            "from_stream": "not supported yet (the replay needs the event history)"}
