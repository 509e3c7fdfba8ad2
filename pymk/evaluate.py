"""`pymk evaluate`: the contract's protocol on one graph, the reference heuristics next to the product.

Offline mode runs the product's ranking code over the past graph in memory (fast iteration); live mode
(``--live``) replays the past through Kafka into a real worker and scores the lists it publishes on
``pymk.recommendations`` — the product as users get it (see :mod:`pymk.streams.evaluate_live`). Models are
trained on the past only (see :mod:`pymk.ranking.product` for how), reproducibly (same inputs, same models:
:mod:`pymk.reproducible`), and cached per data bytes, split, split seed, features and training configs
(:func:`cache_inputs`); a GraphSAGE model is reused across rankers of the same past (:func:`sage_cache_inputs`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pymk.datasets import load_edge_history
from pymk.index.ann import ann_config
from pymk.ranking.evaluation import (
    EvaluationResult,
    EvaluationSplit,
    SplitKind,
    evaluate_methods,
    make_split,
    reference_methods,
    write_report,
)
from pymk.ranking.product import (
    ProductModels,
    ProductTrainingConfigs,
    candidate_sets,
    product_methods,
    product_training_configs,
    train_product_models,
)
from pymk.reproducible import config_digest
from pymk.settings import Settings

LEAKAGE_NOTE = (
    "Models see only the past of the split. Time split: GraphSAGE is trained on the first half of the past "
    "connections; the XGBoost ranker on a temporal replay of the past (checkpoints at 50-90% of it, labels = "
    "connections within the horizon after each checkpoint, all inside the past). Random split: a seeded 20% of "
    "the past connections is hidden and labelled (hold-out replay, the split's own task, in 4 folds hidden one "
    "at a time), and GraphSAGE is trained on the visible 80% only, so it never saw a label. Embeddings come "
    "from that GraphSAGE model. The future is used only to score."
)


def model_schema() -> dict[str, Any]:
    """What a cached model must match to be reused: the ranker's columns and the training task's settings."""
    from pymk.ranking.features import FEATURE_NAMES
    from pymk.ranking.training_data import TrainingDataConfig

    return {"features": list(FEATURE_NAMES), "training": repr(TrainingDataConfig())}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_inputs(data: str | Path, split: EvaluationSplit, hub_degree: int = 0) -> dict[str, Any]:
    """Everything the evaluation's models depend on; a cached model is reused only when all of it matches. The
    file's bytes, not its name (an edited file is other data); the split seed of a random split (models trained
    on seed 0's past have seen ~80 % of seed 1's future); the ranker's columns; the training configs; and the
    libraries whose arithmetic the weights depend on."""
    import torch
    import xgboost

    from pymk.ranking import features

    return {
        "data_sha256": file_sha256(data),
        "split": split.kind,
        "split_seed": split.seed if split.kind == "random" else None,  # the time split uses no seed
        "features": hashlib.sha256(json.dumps(list(features.FEATURE_NAMES)).encode()).hexdigest(),
        "training": config_digest(*_configs(product_training_configs(split, hub_degree=hub_degree))),
        "libraries": {"torch": torch.__version__, "xgboost": xgboost.__version__},
    }


def sage_cache_inputs(data: str | Path, split: EvaluationSplit) -> dict[str, Any]:
    """What the GraphSAGE model alone depends on: the file's bytes, the split (and its seed), its training
    config, which past connections it sees (:func:`pymk.ranking.product.embedding_training_connections`: the
    replay, the holdout share and its seed) and the libraries. Not the ranker's columns or configs: a change of
    the ranker retrains the ranker only."""
    import torch
    import xgboost

    configs = product_training_configs(split)
    data_config = configs.ranker_data
    return {
        "data_sha256": file_sha256(data),
        "split": split.kind,
        "split_seed": split.seed if split.kind == "random" else None,
        "embeddings": config_digest(configs.embeddings),
        "connections": {"replay": data_config.replay, "holdout_fraction": data_config.holdout_fraction,
                        "seed": data_config.seed},
        "libraries": {"torch": torch.__version__, "xgboost": xgboost.__version__},
    }


def cached_sage(model_dir: Path, data: str | Path, split: EvaluationSplit) -> tuple[Path, str] | None:
    """(directory, version) of a GraphSAGE model some earlier run trained on the same :func:`sage_cache_inputs`,
    found through the markers of the evaluation cache; None when there is none."""
    inputs = sage_cache_inputs(data, split)
    for marker in sorted((model_dir / "evaluation").glob("*/models.json")):
        saved = json.loads(marker.read_text())
        sage_dir = Path(saved.get("sage_dir", ""))
        if saved.get("sage_inputs") == inputs and (sage_dir / "metadata.json").exists():
            return sage_dir, str(saved["sage_version"])
    return None


def _configs(configs: ProductTrainingConfigs) -> tuple[Any, ...]:
    return configs.embeddings, configs.ranker_data, configs.ranker


def model_cache_dir(model_dir: Path, data: str | Path, split: EvaluationSplit, hub_degree: int = 0) -> Path:
    """``<model_dir>/evaluation/<stem>-<split>-<16 hex of the cache inputs>``: one folder per set of inputs, so
    runs on other inputs never overwrite (or read) each other's models."""
    key = hashlib.sha256(json.dumps(cache_inputs(data, split, hub_degree), sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(str(data).removesuffix(".gz")).stem.lower()  # a gzipped graph is named as itself
    return model_dir / "evaluation" / f"{stem}-{split.kind}-{key}"


def product_models(split: EvaluationSplit, history: Any, cache_dir: Path, retrain: bool,
                   progress: bool, data: str | Path | None = None, hub_degree: int = 0
                   ) -> tuple[ProductModels, float]:
    """Trained models for this split, from the cache when its marker records the same inputs
    (:func:`cache_inputs`), else trained and recorded. ``data``: the edge-list file (default: the history's).
    ``hub_degree``: the ranker's rows under that cap (GraphSAGE does not depend on it)."""
    inputs = cache_inputs(data if data is not None else history.path, split, hub_degree)
    marker = cache_dir / "models.json"
    if marker.exists() and not retrain:
        saved = json.loads(marker.read_text())
        if saved.get("inputs") == inputs and saved.get("schema") == model_schema():
            return ProductModels(Path(saved["sage_dir"]), Path(saved["ranker_dir"]), saved["sage_version"],
                                 saved["ranker_version"]), 0.0
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = data if data is not None else history.path
    sage = None if retrain else cached_sage(cache_dir.parent.parent, data_path, split)
    models = train_product_models(split, history, cache_dir, progress=progress,
                                  configs=product_training_configs(split, progress=progress, hub_degree=hub_degree),
                                  sage=sage)
    marker.write_text(json.dumps({"sage_dir": str(models.sage_dir), "ranker_dir": str(models.ranker_dir),
                                  "sage_version": models.sage_version, "ranker_version": models.ranker_version,
                                  "schema": model_schema(), "inputs": inputs,
                                  "sage_inputs": sage_cache_inputs(data_path, split)}))
    return models, time.perf_counter() - started


def run_evaluation(settings: Settings, data: str | Path, kind: SplitKind, out_dir: Path, seed: int = 0,
                   live: bool = False, retrain: bool = False, progress: bool = True,
                   two_tower: bool = True, reranker: bool = False, reranker_queries: int | None = None
                   ) -> tuple[EvaluationResult, dict[str, Path]]:
    started = time.perf_counter()
    history = load_edge_history(data)
    split = make_split(history, kind, seed)
    name = f"{Path(str(data).removesuffix('.gz')).stem.lower()}-{kind}"  # a gzipped graph reports as itself
    # PYMK_HUB_DEGREE: the ranker trained and the lists served under the worker's cap, the heuristics capped alike
    hub_degree = settings.hub_degree
    if hub_degree and reranker:
        raise ValueError("the cross-attention re-ranker is not trained under a hub degree: run --reranker without "
                         "PYMK_HUB_DEGREE")
    cache_dir = model_cache_dir(settings.model_dir, data, split, hub_degree)
    models, train_seconds = product_models(split, history, cache_dir, retrain, progress, data=data,
                                           hub_degree=hub_degree)
    ann = ann_config(settings)
    methods: list[Any] = [*reference_methods(split, hub_degree), *product_methods(split, models, ann,
                                                                                   hub_degree=hub_degree)]
    sets = candidate_sets(methods[len(methods) - 3:])
    tower_seconds = 0.0
    if two_tower:
        from pymk.ranking.two_tower_eval import cached_two_tower_models, two_tower_methods

        source = getattr(methods[-1], "source", None)  # the product's past graph, embedded and indexed once
        tower_models, tower_seconds = cached_two_tower_models(split, models, cache_dir / "two-tower", retrain,
                                                              progress)
        methods += two_tower_methods(split, models, tower_models, ann, source=source)
    rerank_seconds = 0.0
    rerank_dir: Path | None = None
    if reranker:  # trained on the split's replay: temporal (time split) or the holdout folds (random split)
        from pymk.ranking.cross_attention_eval import cached_reranker, reranker_method

        hybrid = next(m for m in methods if getattr(m, "name", "") == "hybrid+XGBoost")
        rerank_dir, rerank_seconds = cached_reranker(split, history, models, cache_dir / "reranker", retrain,
                                                     progress, reranker_queries)
        methods.append(reranker_method(hybrid, rerank_dir))
    live_info: dict[str, Any] | None = None
    if live:
        from pymk.streams.evaluate_live import live_method

        live_result = live_method(settings, split, history, models)
        methods.append(live_result.method)
        live_info = live_result.info
        if rerank_dir is not None:  # a second replay into a worker that re-ranks each list's top 50 with the same model
            reranked = live_method(settings, split, history, models, reranker_dir=rerank_dir)
            methods.append(reranked.method)
            live_info = {**live_info, "reranker": reranked.info}
    result = evaluate_methods(split, methods, candidate_sets=sets,
                              timings={"train_models": train_seconds, "train_two_tower": tower_seconds,
                                       "train_reranker": rerank_seconds})
    result.timings["total"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    write_report(result, paths["json"], paths["md"], paths["png"])
    report = json.loads(paths["json"].read_text())
    floor = ranker_floor(models.ranker_dir)
    report["models"] = {"embeddings": models.sage_version, "ranker": models.ranker_version,
                        "ranker_floor": floor, "no_leakage": LEAKAGE_NOTE}
    product = next((m for m in methods if hasattr(m, "cascade_fidelity") and m.name == "hybrid+XGBoost"), None)
    report["models"]["cascade"] = {**(json.loads((models.ranker_dir / "metadata.json").read_text()).get("cascade")
                                      or {"decision": "off", "why": "trained without one"}),
                                   "test": product.cascade_fidelity() if product is not None else None}
    report["mode"] = "live (lists consumed from the recommendations topic)" if live else "offline"
    report["hub_degree"] = hub_degree or None  # PYMK_HUB_DEGREE: no 2-path through a user of more connections
    if live_info is not None:
        report["live"] = live_info
    if rerank_dir is not None:
        from pymk.ranking.cross_attention_eval import reranker_validation

        report["models"]["reranker"] = reranker_validation(rerank_dir)
    paths["json"].write_text(json.dumps(report, indent=2))
    regularisation = floor["regularisation"] or {}
    with paths["md"].open("a") as md:
        md.write(f"\nModels: GraphSAGE `{models.sage_version}`, ranker `{models.ranker_version}`.\n\n"
                 f"Ranker floor (chosen on validation inside the past): {floor['decision']}.\n\n"
                 f"Structure columns: {(floor['structure_columns'] or {}).get('decision', 'n/a')}.\n\n"
                 f"Leaf regularisation: min_child_weight {regularisation.get('min_child_weight', 'n/a')} "
                 f"({regularisation.get('chosen_by', 'n/a')}).\n\n"
                 f"Cascade: {cascade_line(report['models']['cascade'])}.\n\n"
                 f"No leakage: {LEAKAGE_NOTE}\n")
    return result, paths


def cascade_line(cascade: dict[str, Any]) -> str:
    """The cascade's decision in words: its validation share, and the share measured on this evaluation's lists."""
    test = cascade.get("test") or {}
    measured = (f"; on this evaluation's {test['lists_through_cascade']} lists it shortened, top 20 equal to the "
                f"full model's in {test['top20_equal_share']:.4f}" if test.get("lists_through_cascade") else "")
    if cascade.get("decision") != "on":
        return f"off ({cascade.get('why', 'n/a')}){measured}"
    config = cascade["config"]
    return (f"on, {config['trees']} depth-{config['max_depth']} trees pass {cascade['candidates']} rows to the full "
            f"model (validation: top 20 equal in {cascade['top20_equal_share']:.4f} of "
            f"{cascade['lists_longer_than_m']} lists){measured}")


def ranker_floor(ranker_dir: Path) -> dict[str, Any]:
    """What the product's ranker serves, as its training decided on validation: its trees ("model"), the trees
    blended with a reference heuristic ("blend"), or that heuristic alone ("fallback"), with the evidence."""
    metadata = json.loads((Path(ranker_dir) / "metadata.json").read_text())
    evidence = metadata.get("floor_evidence") or {}
    return {"serves": metadata.get("floor_decision", "model"), "floor": metadata.get("floor"),
            "decision": evidence.get("decision", "model (trained without a floor)"),
            "val_recall_at_20": metadata.get("val_recall_at_20"),
            "val_recall_at_20_trees": evidence.get("val_recall_at_20_trees"),
            "val_recall_at_20_heuristics": evidence.get("val_recall_at_20_heuristics"),
            "structure_columns": metadata.get("structure_columns"), "regularisation": metadata.get("regularisation")}


def summary_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    rows = []
    for scores in result.methods:
        rows.append({"method": scores.name, **{f"recall@{k}": round(v, 4) for k, v in scores.recall.items()},
                     "mrr": round(scores.mrr, 4), "coverage": None if scores.coverage is None
                     else round(scores.coverage, 4)})
    return rows

