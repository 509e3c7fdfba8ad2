"""The models a worker serves with: the GraphSAGE embedder and the ranker (XGBoost, or the heuristic before any
model is trained), each with a version string that goes on every embedding and every published list.

Where a model comes from, first match wins: the path in the settings (``PYMK_EMBEDDING_MODEL``,
``PYMK_RANKER_MODEL``); ``<home>/models/{embeddings,ranker}/current`` (what ``pymk train`` writes); the default
shipped in ``data/models`` (trained on ``pymk produce --synthetic`` data, so a fresh install ranks sensibly);
for the ranker, the documented heuristic blend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pymk.index.embedder import Embedder
from pymk.index.sage import load_model
from pymk.ranking.heuristic import HeuristicScorer
from pymk.ranking.model import Ranker

from pymk.settings import Settings

log = logging.getLogger(__name__)

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "data" / "models"


def resolve_model(explicit: str, home_models: Path, kind: str) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    candidates += [home_models / kind / "current", SHIPPED_MODELS / kind]
    for path in candidates:
        if (path / "metadata.json").exists():
            return path
    if explicit:
        raise FileNotFoundError(f"no {kind} model at {explicit} (metadata.json missing)")
    return None


class Models:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        path = resolve_model(settings.embedding_model, settings.model_dir, "embeddings")
        if path is None:
            raise FileNotFoundError("no GraphSAGE model: run `pymk train embeddings` or restore data/models")
        self.sage, self.sage_metadata = load_model(path)
        self.sage_path = path
        self.embedding_model = str(self.sage_metadata["version"])
        ranker_path = resolve_model(settings.ranker_model, settings.model_dir, "ranker")
        self.scorer: Any = Ranker.load(ranker_path) if ranker_path is not None else HeuristicScorer()
        self.ranker_path = ranker_path
        log.info("models: embeddings %s (%s), ranker %s (%s)", self.embedding_model, path,
                 self.scorer.version, ranker_path or "built in")

    def embedder(self, graph: Any, features: Any) -> Embedder:
        return Embedder(self.sage, features, graph)

    def describe(self) -> dict[str, Any]:
        return {"embeddings": {"version": self.embedding_model, "path": str(self.sage_path)},
                "ranker": {"version": self.scorer.version,
                           "path": str(self.ranker_path) if self.ranker_path else None}}
