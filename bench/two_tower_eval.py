"""``python -m pymk.bench.two_tower_eval``: ``pymk evaluate``'s rows plus the two-tower rows on one graph, with the
two-tower cache, thread count and an XGBoost-free run as options (an experiment's knobs)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymk.index.ann import ann_config
from pymk.ranking.two_tower_eval import cached_two_tower_models, two_tower_methods


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pymk.bench.two_tower_eval --data FILE --split time|random [--out DIR] [--retrain]``: the
    reference, product and two-tower rows on one graph (models cached as ``pymk evaluate`` caches them)."""
    import argparse

    from pymk.datasets import load_edge_history
    from pymk.evaluate import model_cache_dir, product_models, summary_rows
    from pymk.ranking.evaluation import evaluate_methods, make_split, reference_methods, write_report
    from pymk.ranking.product import candidate_sets, product_methods
    from pymk.settings import Settings

    parser = argparse.ArgumentParser(description="pymk evaluate with the two-tower rows.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", choices=("time", "random"), default="time")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--cache", type=Path, default=None,
                        help="model cache of this graph and split (default: pymk evaluate's, under the model dir)")
    parser.add_argument("--tower-cache", type=Path, default=None, help="two-tower cache (default: CACHE/two-tower)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--without-xgboost", action="store_true",
                        help="skip the product rows and the blend (e.g. while the cached ranker is stale)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    settings = Settings()
    started = time.perf_counter()
    history = load_edge_history(args.data)
    split = make_split(history, args.split)
    name = f"{args.data.stem.lower()}-{args.split}"
    cache_dir = args.cache or model_cache_dir(settings.model_dir, args.data, split)
    cache_dir.mkdir(parents=True, exist_ok=True)
    models, product_seconds = product_models(split, history, cache_dir, args.retrain, progress=True, data=args.data)
    tower_models, tower_seconds = cached_two_tower_models(split, models, args.tower_cache or cache_dir / "two-tower",
                                                          args.retrain, progress=True)
    ann = ann_config(settings)
    product = [] if args.without_xgboost else product_methods(split, models, ann)
    source = getattr(product[-1], "source", None) if product else None
    methods: list[Any] = [*reference_methods(split), *product, *two_tower_methods(
        split, models, tower_models, ann, source=source, with_blend=not args.without_xgboost)]
    result = evaluate_methods(split, methods, candidate_sets=candidate_sets(product) if product else None,
                              timings={"train_models": product_seconds, "train_two_tower": tower_seconds})
    result.timings["total"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(result, args.out / f"{name}.json", args.out / f"{name}.md", args.out / f"{name}.png")
    print(json.dumps({"rows": summary_rows(result), "two_tower": tower_models.metadata,
                      "timings": result.timings}, indent=2, default=str))


if __name__ == "__main__":
    main()
