"""Which trained model version the workers serve: the ``current`` pointer (``<home>/models/<kind>/current``), its
history and rollback, and the rules a newly trained model must pass before it may become current (enough rows of
each class; a better held-out Recall@20 than the serving model).

Here, below both the offline commands (:mod:`pymk.train`) and the stream's own training
(:mod:`pymk.streams.stream_training`), so that each can use them without importing the other."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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
