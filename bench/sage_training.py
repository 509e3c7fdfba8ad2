"""``python -m pymk.bench.sage_training``: train the GraphSAGE user model on the first share of an edge-list
file's connections with explicit batch size and threads, and print its metadata (what ``pymk train embeddings``
does for the product, with the knobs an experiment needs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pymk.index.training import EmbeddingTrainingConfig, train_embeddings


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pymk.bench.sage_training --data FILE --out DIR [--train-share 0.8]``: train on the first
    ``train-share`` of the file's connections (by time) and print the metadata summary."""
    import argparse
    import json

    from pymk.datasets import load_edge_history

    parser = argparse.ArgumentParser(description="Train the GraphSAGE user model on an edge-list file.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-share", type=float, default=0.8, help="share of connections to train on")
    parser.add_argument("--epochs", type=int, default=EmbeddingTrainingConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=EmbeddingTrainingConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    connections = load_edge_history(args.data).connections
    connections = connections[: int(args.train_share * len(connections))]
    config = EmbeddingTrainingConfig(epochs=args.epochs, batch_size=args.batch_size, threads=args.threads,
                                     seed=args.seed)
    result = train_embeddings(connections, None, args.out, config)
    summary = {key: value for key, value in result.metadata.items() if key != "history"}
    summary["curve_png"] = str(result.curve_png)
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
