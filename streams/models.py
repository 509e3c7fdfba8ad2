"""The models a worker serves with: the GraphSAGE embedder and the ranker (XGBoost, or the heuristic before any
model is trained), each with a version string that goes on every embedding and every published list.

Where a model comes from, first match wins: the path in the settings (``PYMK_EMBEDDING_MODEL``,
``PYMK_RANKER_MODEL``); ``<home>/models/{embeddings,ranker}/current`` (what ``pymk train`` writes); the default
shipped in ``data/models`` (trained on ``pymk produce --synthetic`` data, so a fresh install ranks sensibly);
for the ranker, the documented heuristic blend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pymk.index.embedder import Embedder
from pymk.index.sage import load_model
from pymk.paths import bundled_data
from pymk.ranking.cascade import cascade_description
from pymk.ranking.heuristic import HeuristicScorer
from pymk.ranking.model import Ranker
from pymk.ranking.tree_eval import EvaluatorOptions
from pymk.settings import Settings

log = logging.getLogger(__name__)

SHIPPED_MODELS = bundled_data("models")


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
    """The serving models, reloaded in place when what their paths point at changes (``pymk train`` and
    ``pymk model rollback`` swap the ``current`` symlink; the worker's timer calls :meth:`reload_if_changed`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sage_path, self.ranker_path = self._paths()
        self.sage, self.sage_metadata = load_model(self.sage_path)
        self.embedding_model = str(self.sage_metadata["version"])
        self.evaluator_options = EvaluatorOptions.from_settings(settings)
        self.scorer: Any = self._load_ranker(self.ranker_path)
        self._loaded = (self._identity(self.sage_path), self._identity(self.ranker_path))
        self.two_tower: Any = None
        if settings.ranker_kind != "xgboost" or settings.ann_space == "two-tower":
            from pymk.ranking.two_tower import TwoTowerRanker, load_two_tower

            tower_path = resolve_model(settings.two_tower_model, settings.model_dir, "two-tower")
            if tower_path is None:
                raise FileNotFoundError(f"PYMK_RANKER_KIND={settings.ranker_kind} / PYMK_ANN_SPACE="
                                        f"{settings.ann_space} needs a two-tower model (pymk train two-tower, or "
                                        "PYMK_TWO_TOWER_MODEL)")
            self.two_tower = TwoTowerRanker(load_two_tower(tower_path)[0])
        self.reranker_path = self._reranker_path()
        self.reranker: Any = self._load_reranker(self.reranker_path)
        self._reranker_loaded = self._identity(self.reranker_path)
        self.reloads = 0
        log.info("models: embeddings %s (%s), ranker %s (%s, %s)", self.embedding_model, self.sage_path,
                 self.scorer.version, self.ranker_path or "built in", getattr(self.scorer, "evaluator", "heuristic"))

    @property
    def ranker_version(self) -> str:
        """The model_version published on lists: Stage 2's (below), with ``+<re-ranker version>`` when a re-ranker
        re-orders its top 50."""
        if self.reranker is not None:
            return f"{self._stage2_version()}+{self.reranker.version}"
        return self._stage2_version()

    def _stage2_version(self) -> str:
        """The ranker, the two-tower model, or both for a blend."""
        if self.two_tower is None or self.settings.ranker_kind == "xgboost":
            return str(self.scorer.version)
        if self.settings.ranker_kind == "two-tower":
            return str(self.two_tower.version)
        return f"blend({self.scorer.version},{self.two_tower.version},w={self.settings.blend_weight:g})"

    def _paths(self) -> tuple[Path, Path | None]:
        sage = resolve_model(self.settings.embedding_model, self.settings.model_dir, "embeddings")
        if sage is None:
            raise FileNotFoundError("no GraphSAGE model: run `pymk train embeddings` or restore data/models")
        return sage, resolve_model(self.settings.ranker_model, self.settings.model_dir, "ranker")

    def _reranker_path(self) -> Path | None:
        if self.settings.reranker == "none":
            return None
        path = resolve_model(self.settings.reranker_model, self.settings.model_dir, "reranker")
        if path is None:
            raise FileNotFoundError("PYMK_RERANKER=cross-attention needs a model (pymk train reranker, or "
                                    "PYMK_RERANKER_MODEL)")
        return path

    @staticmethod
    def _load_reranker(path: Path | None) -> Any:
        if path is None:
            return None
        from pymk.ranking.cross_attention import load_cross_attention  # torch model: imported only when asked for

        return load_cross_attention(path)[0]

    def _load_ranker(self, path: Path | None) -> Any:
        """The ranker with its tree evaluator prepared (compiled once per machine: seconds the first time)."""
        return Ranker.load(path, self.evaluator_options) if path is not None else HeuristicScorer()

    @staticmethod
    def _identity(path: Path | None) -> tuple[str, str] | None:
        """What a path means now: the folder it resolves to and the version in its metadata."""
        if path is None:
            return None
        resolved = path.resolve()
        try:
            version = json.loads((resolved / "metadata.json").read_text()).get("version", "")
        except (OSError, ValueError):
            version = ""
        return str(resolved), str(version)

    def load_changed(self) -> dict[str, Any] | None:
        """Load (without serving them yet) whichever models changed since the last :meth:`apply`: the slow half
        of a reload (reading, and the tree evaluator's preparation), safe on a thread. None: nothing to apply
        (no change, or a half-written model, or one that fails to load, left for the next call)."""
        try:
            sage_path, ranker_path = self._paths()
        except FileNotFoundError:
            return None
        sage_id, ranker_id = self._identity(sage_path), self._identity(ranker_path)
        try:
            reranker_path = self._reranker_path()
        except FileNotFoundError:
            reranker_path = self.reranker_path
        reranker_id = self._identity(reranker_path)
        if (sage_id, ranker_id) == self._loaded and reranker_id == self._reranker_loaded:
            return None
        pending: dict[str, Any] = {"ids": (sage_id, ranker_id), "reranker_id": reranker_id}
        try:
            if reranker_id != self._reranker_loaded:
                pending["reranker"] = (reranker_path, self._load_reranker(reranker_path))
            if sage_id != self._loaded[0]:
                pending["embeddings"] = (sage_path, *load_model(sage_path))
            if ranker_id != self._loaded[1]:
                pending["ranker"] = (ranker_path, self._load_ranker(ranker_path))
        except Exception:  # noqa: BLE001 - keep serving with the models in hand
            log.exception("could not load the new model; still serving %s / %s", self.embedding_model,
                          self.scorer.version)
            return None
        return pending

    def apply(self, pending: dict[str, Any] | None) -> dict[str, str]:
        """Serve what :meth:`load_changed` loaded (quick: attribute swaps); returns {kind: new version}."""
        changed: dict[str, str] = {}
        if pending is None:
            return changed
        if "embeddings" in pending:
            self.sage_path, self.sage, self.sage_metadata = pending["embeddings"]
            self.embedding_model = str(self.sage_metadata["version"])
            changed["embeddings"] = self.embedding_model
        if "ranker" in pending:
            self.ranker_path, self.scorer = pending["ranker"]
            changed["ranker"] = self.scorer.version
        if "reranker" in pending:
            self.reranker_path, self.reranker = pending["reranker"]
            changed["reranker"] = self.reranker.version
        self._loaded = pending["ids"]
        self._reranker_loaded = pending.get("reranker_id", self._reranker_loaded)
        if changed:
            self.reloads += 1
            log.info("models reloaded: %s", changed)
        return changed

    def reload_if_changed(self) -> dict[str, str]:
        """Load and serve whichever model changed since the last call; return {kind: new version} of what was
        reloaded. A half-written model (no metadata yet, or one that fails to load) is left for the next call."""
        return self.apply(self.load_changed())

    def embedder(self, graph: Any, features: Any, cache: Any = None) -> Embedder:
        return Embedder(self.sage, features, graph, cache=cache, threads=self.settings.embed_threads)

    def describe(self) -> dict[str, Any]:
        ranker: dict[str, Any] = {"version": self.scorer.version,
                                  "path": str(self.ranker_path) if self.ranker_path else None}
        if isinstance(self.scorer, Ranker):  # "compiled-c", or "xgboost (why not)"
            ranker["evaluator"] = self.scorer.evaluator
            ranker["evaluator_kernel"] = self.scorer.evaluator_kernel
            # whether long lists go through a pre-ranker first (ranking/cascade.py), and how it was validated
            ranker["cascade"] = cascade_description(self.scorer.metadata)
        out = {"embeddings": {"version": self.embedding_model, "path": str(self.sage_path)}, "ranker": ranker}
        if self.reranker is not None:
            out["reranker"] = {"version": self.reranker.version, "path": str(self.reranker_path)}
        return out
