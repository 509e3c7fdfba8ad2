"""Reproduce the contract's reference Recall@20 table on the four graphs of data/, with timings.

    python -m pymk.bench.evaluation_check [--data-dir DIR] [--out-dir DIR]

Prints one Markdown table (method × graph: Recall@20 vs reference, Recall@50, MRR, coverage) and exits 1 if any
reference row is outside ±REFERENCE_TOLERANCE. With --out-dir, also writes each graph's JSON/Markdown/PNG report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pymk.paths import bundled_data
from pymk.ranking.evaluation import REFERENCE_TOLERANCE, SplitKind, evaluate_path, write_report

DEFAULT_DATA_DIR = bundled_data("")
GRAPHS: tuple[tuple[str, SplitKind], ...] = (
    ("collegemsg/CollegeMsg.txt", "time"),
    ("digg-reply/digg_reply.txt.gz", "time"),
    ("ego-facebook/facebook_combined.txt.gz", "random"),
    ("ca-hepph/CA-HepPh.txt.gz", "random"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    all_within = True
    print("| data | split | method | Recall@20 | reference | delta | Recall@50 | MRR | coverage | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for relative_path, kind in GRAPHS:
        started = time.perf_counter()
        result = evaluate_path(args.data_dir / relative_path, kind)
        reference = result.reference()
        for scores in result.methods:
            row = reference.get(scores.name)
            expected = "" if row is None else f"{row['reference']:.4f}"
            delta = "" if row is None else f"{row['delta']:+.4f}"
            if row is not None and abs(row["delta"]) > REFERENCE_TOLERANCE:
                all_within = False
            own_coverage = "" if scores.coverage is None else f"{scores.coverage:.4f}"
            print(f"| {relative_path} | {kind} | {scores.name} | {scores.recall[20]:.4f} | {expected} | {delta} "
                  f"| {scores.recall[50]:.4f} | {scores.mrr:.4f} | {own_coverage} | {scores.seconds:.2f} |")
        sizes = ", ".join(f"{name}={value}" for name, value in result.sizes.items())
        coverage = ", ".join(f"{name}={fraction:.4f}" for name, fraction in result.coverage.items())
        print(f"|   | {relative_path}: {sizes}; coverage {coverage}; load {result.timings['load']:.2f}s, "
              f"split {result.timings['split']:.2f}s, total {time.perf_counter() - started:.2f}s |", flush=True)
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            stem = args.out_dir / Path(relative_path).stem
            write_report(result, stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png"))
    print("all reference rows within tolerance" if all_within else "SOME REFERENCE ROWS OUTSIDE TOLERANCE")
    return 0 if all_within else 1


if __name__ == "__main__":
    sys.exit(main())
