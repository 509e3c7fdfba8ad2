"""`pymk train embeddings|ranker`: offline training from an edge list or a synthetic network, and the
``current`` pointer the workers load from (``<home>/models/<kind>/current``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pymk.datasets import load_edge_history
from pymk.events import ConnectionEvent, InputEvent, Profile, UserEvent
from pymk.features.profile import merge_profile
from pymk.ranking.memory_source import MemorySource
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


class TrainingRefused(ValueError):
    """Training that must not go on (too little data to learn or to validate on): one line for the command."""


MIN_CLASS_ROWS = 10  # positives and negatives each split (train, validation) needs before a model is trained


def check_split_classes(train_labels: np.ndarray, val_labels: np.ndarray, what: str, advice: str) -> None:
    """:class:`TrainingRefused` unless both splits have at least :data:`MIN_CLASS_ROWS` positives and negatives: a
    validation split with one class cannot say whether the new model is better, and must not let it be promoted."""
    counts = {name: (int((labels > 0).sum()), int((labels <= 0).sum()))
              for name, labels in (("training", train_labels), ("validation", val_labels))}
    if all(min(pos, neg) >= MIN_CLASS_ROWS for pos, neg in counts.values()):
        return
    found = "; ".join(f"{name} {pos} positive and {neg} negative" for name, (pos, neg) in counts.items())
    raise TrainingRefused(f"too little data to train on ({what}: {found}; each split needs at least "
                          f"{MIN_CLASS_ROWS} of each): {advice}")


def promotion(new_recall: float | None, new_auc: float | None, serving_recall: float | None,
              serving_auc: float | None) -> tuple[bool, str]:
    """Whether a new model replaces the serving one, judged on the same held-out labels: a higher Recall@20, or an
    equal one with a higher AUC. A metric that could not be measured (None, NaN) never favours the new model."""
    def known(value: float | None) -> bool:
        return value is not None and value == value

    def fmt(value: float | None) -> str:
        return f"{value:.4f}" if known(value) else "n/a"

    figures = (f"validation Recall@20 {fmt(new_recall)} vs the serving model's {fmt(serving_recall)}, "
               f"AUC {fmt(new_auc)} vs {fmt(serving_auc)}")
    if not known(new_recall):
        return False, f"not promoted: the new model's Recall@20 could not be measured ({figures})"
    if not known(serving_recall) or new_recall > serving_recall:  # type: ignore[operator]
        return True, f"promoted: {figures}"
    if new_recall == serving_recall and known(new_auc) and (not known(serving_auc) or new_auc > serving_auc):  # type: ignore[operator]
        return True, f"promoted (equal Recall@20, higher AUC): {figures}"
    return False, f"not promoted, the serving model stays current: {figures}"


def training_events(data: str | None, synthetic: int | None, seed: int) -> tuple[list[InputEvent] | None, str]:
    """The events to learn from, and a description for the model's metadata."""
    if synthetic:
        from pymk.streams.producer import synthetic_events

        return synthetic_events(synthetic, seed=seed), f"synthetic:{synthetic}:seed{seed}"
    assert data is not None
    return None, str(data)


def point_current(model_dir: Path, record: bool = True) -> Path:
    """Make ``<kind>/current`` point at ``model_dir`` (a relative symlink, replaced atomically); running workers
    load it within ``model_reload_interval_s``. ``record``: append it to ``history`` (what rollback undoes)."""
    current = model_dir.parent / "current"
    temporary = model_dir.parent / f".current-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(model_dir.name)
    os.replace(temporary, current)
    if record:
        with (model_dir.parent / "history").open("a") as history:
            history.write(model_dir.name + "\n")
    return current


def model_history(kind_dir: Path) -> list[str]:
    path = kind_dir / "history"
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


SHIPPED_DEFAULT = "(none: shipped default)"


def rollback(kind_dir: Path) -> str:
    """Point ``current`` back at the version before it (one step per call); returns that version. From the first
    trained version, back to the shipped default: ``current`` is removed, and workers fall back to it."""
    history = model_history(kind_dir)
    if not history:
        raise ValueError(f"{kind_dir}: no trained version to roll back from (serving the shipped default)")
    if len(history) == 1:
        current = kind_dir / "current"
        if current.is_symlink() or current.exists():
            current.unlink()
        (kind_dir / "history").write_text("")
        return SHIPPED_DEFAULT
    previous = history[-2]
    if not (kind_dir / previous / "metadata.json").exists():
        raise FileNotFoundError(f"{kind_dir / previous} is gone")
    point_current(kind_dir / previous, record=False)
    (kind_dir / "history").write_text("".join(f"{v}\n" for v in history[:-1]))
    return previous


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


def embeddings_at_checkpoint(model_dir: Path) -> Callable[[MemorySource, int], dict[int, np.ndarray]]:
    """For the ranker's temporal replay: every user's GraphSAGE embedding on the past-only graph at a checkpoint
    (the model itself is fixed; it should have been trained on data before the evaluated period)."""
    from pymk.index.embedder import Embedder, salt_for_version
    from pymk.index.sage import load_model

    model, metadata = load_model(model_dir)
    salt = salt_for_version(str(metadata["version"]))

    def embed(source: MemorySource, as_of_ms: int) -> dict[int, np.ndarray]:
        users = sorted(source.users())
        if not users:
            return {}
        vectors = Embedder(model, source, source).embed(users, salt)
        return dict(zip(users, vectors, strict=True))

    return embed


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
