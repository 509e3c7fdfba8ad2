"""The ``pymk`` command line. Each subcommand is a thin wrapper over a function of the package."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pymk.datasets import FORMATS_HELP
from pymk.paths import bundled_data
from pymk.settings import Settings

DEFAULT_BENCH_DATA = bundled_data("ego-facebook/facebook_combined.txt.gz")


def _cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.kafka_broker import BrokerError, LocalBroker

    broker = LocalBroker(settings)
    try:
        if args.action == "start":
            import time

            started = time.monotonic()
            was_running = broker.status().running
            status = broker.start()
            if not was_running:
                from pymk.streams.topics import ensure_topics

                created = ensure_topics(settings)
                print(f"{status.describe()}; ready in {time.monotonic() - started:.1f} s; "
                      f"log {broker.log_file}; topics created: {len(created)}")
            else:
                print(status.describe() + " (already)")
        elif args.action == "stop":
            print("stopped" if broker.stop() else "not running")
        else:
            status = broker.status()
            print(status.describe())
            return 0 if status.running else 3
    except BrokerError as exc:
        print(f"pymk kafka {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.topics import contract_topics, ensure_topics

    if args.action == "create":
        created = ensure_topics(settings)
        print(f"created {len(created)} topic(s): {', '.join(created) or '-'}")
    else:
        for spec in contract_topics(settings):
            print(f"{spec.name}\t{spec.partitions}\t{spec.config or ''}")
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.app import run_worker

    run_worker(settings, loglevel=args.loglevel)
    return 0


def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.producer import (
        event_messages,
        raw_messages,
        replay_events,
        send_messages,
        synthetic_events,
    )
    from pymk.streams.topics import ensure_topics

    ensure_topics(settings)
    if args.raw:
        if not args.topic:
            print("--raw needs --topic", file=sys.stderr)
            return 2
        topic = args.topic if "." in args.topic else settings.topic(args.topic)
        with open(args.raw, "rb") as handle:
            total = sum(1 for _ in handle)
        report = send_messages(settings, raw_messages(topic, args.raw), total, rate=args.rate,
                               progress=not args.quiet)
    else:
        if args.synthetic:
            events = synthetic_events(args.synthetic, seed=args.seed)
        elif args.data:
            events = replay_events(args.data, behaviour=args.behaviour, seed=args.seed)
        else:
            print("give --data PATH, --synthetic N or --raw FILE --topic T", file=sys.stderr)
            return 2
        if args.limit:
            events = events[: args.limit]
        report = send_messages(settings, event_messages(settings, events), len(events), rate=args.rate,
                               progress=not args.quiet)
    print(report.describe())
    return 0


def _cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.consumer import latest_per_user, print_recommendations, read_recommendations

    records = read_recommendations(settings, user=args.user, follow=args.follow)
    if not args.follow and not args.all_versions:
        records = iter(latest_per_user(records).values())
    count = print_recommendations(records, as_json=args.json)
    if not args.json:
        print(f"({count} list(s))", file=sys.stderr)
    return 0


def _cmd_lag(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.lag import consumer_lag

    lag = consumer_lag(settings)
    if args.json:
        print(json.dumps({"group": settings.app_id, "lag": lag, "total": sum(lag.values())}))
    else:
        for topic, value in lag.items():
            print(f"{topic:<40} {value:>10}")
        print(f"{'total':<40} {sum(lag.values()):>10}")
    return 0


def _cmd_wait_idle(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.lag import WorkerUnreachable, wait_idle

    workers = args.worker or [f"http://{settings.web_host}:{settings.web_port}"]
    try:
        idle = wait_idle(settings, timeout_s=args.timeout, worker_urls=workers,
                         unreachable_grace_s=args.unreachable_grace)
    except WorkerUnreachable as exc:
        print(f"pymk wait-idle: {exc}", file=sys.stderr)
        return 2
    if idle:
        print("idle: every input is processed, every refreshed list published")
        return 0
    print(f"still busy after {args.timeout} s", file=sys.stderr)
    return 1


def _get_json(url: str) -> tuple[int, object]:
    """(HTTP status, decoded JSON body) of a worker's debug page; status 0 when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}
    except OSError as exc:
        return 0, {"error": str(exc)}


def _cmd_neighbours(args: argparse.Namespace, settings: Settings) -> int:
    base = args.url or f"http://{settings.web_host}:{settings.web_port}"
    status, data = _get_json(f"{base}/neighbours/{args.user}?k={args.k}")
    if status != 200 or not isinstance(data, dict):
        print(f"pymk neighbours: {status or 'no worker at ' + base}: {data}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data))
        return 0
    if data["embedding"] is None:
        print(f"user {args.user} has no embedding in the index")
        return 1
    embedding = data["embedding"]
    print(f"user {args.user}: embedding v{embedding['version']} ({embedding['model_version']}), "
          f"computed at {embedding['computed_at']}")
    print(f"  {'rank':>4}  {'user':>12}  cosine")
    for rank, item in enumerate(data["neighbours"], start=1):
        print(f"  {rank:>4}  {item['user']:>12}  {item['cosine']:.4f}")
    return 0


def _cmd_refresh(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.streams.producer import send_commands

    count = send_commands(settings, user=args.user, reembed=args.reembed or args.embeddings_only,
                          rank=not args.embeddings_only)
    print(f"sent {count} refresh command(s); lists follow on {settings.topic('recommendations')}")
    return 0


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.train import train_embeddings_command, train_ranker_command

    out = Path(args.out) if args.out else settings.model_dir / args.kind
    if args.from_stream:
        if args.kind != "ranker":
            print("pymk train: --from-stream trains the ranker", file=sys.stderr)
            return 2
        from pymk.streams.stream_training import train_from_stream

        report = train_from_stream(settings, out)
        print(json.dumps(report, indent=2))
        print(f"pymk train: {report['why']}", file=sys.stderr)
        return 0
    if not args.data and not args.synthetic:
        print("pymk train: give --data PATH, --synthetic N or --from-stream", file=sys.stderr)
        return 2
    if args.kind == "embeddings":
        result = train_embeddings_command(args.data, args.synthetic, args.seed, out, epochs=args.epochs,
                                          progress=not args.quiet)
    elif args.kind == "ranker":
        result = train_ranker_command(args.data, args.synthetic, args.seed, out, settings,
                                      embeddings=Path(args.embeddings) if args.embeddings else None,
                                      progress=not args.quiet)
        print(f"pymk train: {result['why']}", file=sys.stderr)
    elif args.kind == "reranker":
        from pymk.train import train_reranker_command

        result = train_reranker_command(args.data, args.synthetic, args.seed or 0, out, settings,
                                        embeddings=Path(args.embeddings) if args.embeddings else None,
                                        epochs=args.epochs if args.epochs != 20 else None, progress=not args.quiet)
    else:
        from pymk.train import train_two_tower_command

        result = train_two_tower_command(args.data, args.synthetic, args.seed, out, settings, loss=args.loss,
                                         epochs=min(args.epochs, 20), progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.evaluate import run_evaluation, summary_rows

    out_dir = Path(args.out_dir)
    result, paths = run_evaluation(settings, args.data, args.split, out_dir, seed=args.seed_split, live=args.live,
                                   retrain=args.retrain, progress=not args.quiet, two_tower=not args.no_two_tower,
                                   reranker=args.reranker, reranker_queries=args.reranker_queries)
    if args.json:
        Path(args.json).write_text(paths["json"].read_text())
    print(paths["md"].read_text())
    print(f"report: {paths['json']}  {paths['md']}  plot: {paths['png']}")
    if args.quiet:
        print(json.dumps(summary_rows(result)))
    return 0


def _cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.ranking.model_store import SHIPPED_DEFAULT, model_history, rollback

    kind_dir = settings.model_dir / args.kind
    if args.action == "rollback":
        try:
            version = rollback(kind_dir)
        except (ValueError, FileNotFoundError) as exc:
            print(f"pymk model rollback: {exc}", file=sys.stderr)
            return 1
        print(f"{args.kind}: current → {version}; running workers load it within "
              f"{settings.model_reload_interval_s:g} s")
        return 0
    current = kind_dir / "current"
    print(f"{args.kind}: current = {current.resolve().name if current.exists() else SHIPPED_DEFAULT}")
    for version in model_history(kind_dir):
        print(f"  {version}")
    return 0


def _cmd_soak(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from pymk.bench.soak import run_soak

    run_settings = replace(settings, recommend=not args.features_only)
    result = run_soak(run_settings, rate=args.rate, minutes=args.minutes, out_dir=Path(args.out), users=args.users,
                      same_users=args.same_users)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_features(args: argparse.Namespace, settings: Settings) -> int:
    import urllib.error
    import urllib.request

    base = args.url or f"http://{settings.web_host}:{settings.web_port}"
    path = f"/features/{args.user}/{args.candidate}" if args.candidate is not None else f"/users/{args.user}"
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"pymk features: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pymk features: no worker answers at {base} ({exc}); is `pymk worker` running?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data))
    elif args.candidate is not None:
        print(f"user {data['user']} × candidate {data['candidate']}   (mutual examples: {data['mutual_examples']})")
        print(f"  {'feature':<32} {'value':>14}  last changed (event ts, ms)")
        for name, feature in data["features"].items():
            value = feature["value"]
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            print(f"  {name:<32} {shown:>14}  {feature['ts'] if feature['ts'] is not None else '-'}")
    else:
        for key, value in data.items():
            print(f"  {key:<20} {json.dumps(value)}")
    return 0


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from pymk.bench.ingest import bench_ingest

    if args.what == "hubs":
        from pymk.bench.hubs import DEFAULT_GRAPHS as HUB_GRAPHS
        from pymk.bench.hubs import bench_hubs

        result = bench_hubs([(Path(args.data), args.split)] if args.data else HUB_GRAPHS)
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    if args.what == "ann-shards":  # the sharded index's scatter-gather against one replicated index
        from pymk.bench.ann_shards import run_sharded_benchmark
        from pymk.streams.global_index import ann_config

        result = run_sharded_benchmark(args.users or 20_000, args.shards, config=ann_config(settings),
                                       sigmas=settings.ann_shard_k_sigmas)
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    if args.what == "capacity":
        from pymk.bench.capacity import DEFAULT_GRAPHS, DEFAULT_PARTITIONS, bench_capacity
        from pymk.streams.global_index import ann_config

        result = bench_capacity([args.data] if args.data else DEFAULT_GRAPHS,
                                args.partitions or DEFAULT_PARTITIONS, ann_config(settings),
                                lists_per_core_second=args.lists_per_core, plot=args.plot)
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    args.data = args.data or str(DEFAULT_BENCH_DATA)
    if args.what == "ingest":
        result = bench_ingest(settings, args.data, timeout_s=args.timeout)
    elif args.what == "index":
        from pymk.bench.index import bench_index
        from pymk.streams.global_index import ann_config
        from pymk.streams.models import resolve_model

        model = resolve_model(settings.embedding_model, settings.model_dir, "embeddings")
        if model is None:
            print("pymk bench index: no GraphSAGE model (pymk train embeddings)", file=sys.stderr)
            return 2
        result = bench_index(args.data, model, ann_config(settings))
    elif args.what == "rank":
        from pymk.bench.rank import bench_rank

        result = bench_rank(args.data, ranker_path=args.ranker)
    else:
        from pymk.bench.freshness import bench_freshness

        result = bench_freshness(settings, rate=args.rate, seconds=args.seconds, users=args.users or 3000,
                                 timeout_s=args.timeout, workers=args.workers)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pymk", description="Streaming People-You-May-Know.")
    sub = parser.add_subparsers(dest="command", required=True)

    kafka = sub.add_parser("kafka", help="the local Apache Kafka broker (no Docker needed)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(func=_cmd_kafka)

    topics = sub.add_parser("topics", help="create or list the topics of the contract")
    topics.add_argument("action", choices=["create", "list"])
    topics.set_defaults(func=_cmd_topics)

    worker = sub.add_parser("worker", help="run a stream worker (several may run in one consumer group)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_cmd_worker)

    produce = sub.add_parser("produce", help="send events to the input topics")
    source = produce.add_mutually_exclusive_group()
    source.add_argument("--data", help=FORMATS_HELP)
    source.add_argument("--synthetic", type=int, metavar="N", help="a generated social network of N users")
    source.add_argument("--raw", metavar="FILE", help="send each line of FILE unchanged (with --topic)")
    produce.add_argument("--topic", help="topic for --raw (full name, or a short one like connections)")
    produce.add_argument("--behaviour", action="store_true",
                         help="mix in seeded synthetic profiles, profile views, dismissals and engagements")
    produce.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    produce.add_argument("--seed", type=int, default=None)
    produce.add_argument("--limit", type=int, default=None, help="send only the first N events")
    produce.add_argument("--quiet", action="store_true", help="no progress bar")
    produce.set_defaults(func=_cmd_produce)

    consume = sub.add_parser("consume", help="read the recommendations topic")
    consume.add_argument("--user", type=int, default=None)
    consume.add_argument("--follow", action="store_true", help="keep waiting for new lists")
    consume.add_argument("--json", action="store_true", help="one JSON object per line")
    consume.add_argument("--all-versions", action="store_true",
                         help="every list published, not only the latest per user")
    consume.set_defaults(func=_cmd_consume)

    lag = sub.add_parser("lag", help="consumer lag of the workers per input topic")
    lag.add_argument("--json", action="store_true")
    lag.set_defaults(func=_cmd_lag)

    wait = sub.add_parser("wait-idle", help="return when every input is processed (exit 0; 1: still busy at "
                          "the timeout; 2: a worker does not answer, dead or not started)")
    wait.add_argument("--timeout", type=float, default=120.0)
    wait.add_argument("--unreachable-grace", type=float, default=10.0, metavar="S",
                      help="a worker that does not answer for this long is dead (exit 2); a restarting worker "
                           "answers again within it")
    wait.add_argument("--worker", action="append", metavar="URL",
                      help="a worker's debug address whose pending refreshes must be done too (repeatable; "
                           "default: the settings' web host/port)")
    wait.set_defaults(func=_cmd_wait_idle)

    features = sub.add_parser("features", help="feature state of a user, or of a (user, candidate) pair")
    features.add_argument("user", type=int)
    features.add_argument("candidate", type=int, nargs="?")
    features.add_argument("--json", action="store_true")
    features.add_argument("--url", help="a worker's debug HTTP address (default: the settings' web host/port)")
    features.set_defaults(func=_cmd_features)

    train = sub.add_parser("train", help="offline training; writes <home>/models/<kind>/<version> and points "
                                         "<kind>/current at it (workers load current at start)")
    train.add_argument("kind", choices=["embeddings", "ranker", "two-tower", "reranker"])
    train_source = train.add_mutually_exclusive_group()
    train_source.add_argument("--data", help=FORMATS_HELP)
    train_source.add_argument("--synthetic", type=int, metavar="N", help="a generated network of N users, "
                                                                         "with profiles and behaviour")
    train_source.add_argument("--from-stream", action="store_true",
                              help="ranker: learn from the logged impressions and what users did after them")
    train.add_argument("--out", help="parent folder of the model (default <home>/models/<kind>)")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--embeddings", help="GraphSAGE model folder whose cosine the ranker learns from "
                                            "(default: the one the workers would load)")
    train.add_argument("--loss", choices=["B1", "B2", "B3"], default="B2",
                       help="two-tower: B1 binary cross-entropy, B2 in-batch sampled softmax, B3 triplet")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="the contract's evaluation protocol: reference heuristics and the "
                                               "product on one graph; JSON, Markdown and a PNG plot")
    evaluate.add_argument("--data", required=True, help=FORMATS_HELP)
    evaluate.add_argument("--split", choices=["time", "random"], required=True)
    evaluate.add_argument("--json", help="also write the JSON report here")
    evaluate.add_argument("--out-dir", default="reports", help="folder of the reports (default: reports)")
    evaluate.add_argument("--live", action="store_true",
                          help="also replay the past through Kafka into a worker and score its published lists")
    evaluate.add_argument("--retrain", action="store_true", help="train the models again (default: cached)")
    evaluate.add_argument("--no-two-tower", action="store_true", help="skip the two-tower rows (faster)")
    evaluate.add_argument("--reranker", action="store_true",
                          help="add the hybrid+XGBoost+cross-attention row (trains the re-ranker on the split's "
                               "replay: minutes)")
    evaluate.add_argument("--reranker-queries", type=int, default=None,
                          help="cap the re-ranker's training queries (per checkpoint, or in all of a holdout's folds; "
                               "default 400 / 2000): for large graphs")
    evaluate.add_argument("--seed-split", type=int, default=0, help="seed of the random split")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=_cmd_evaluate)

    model = sub.add_parser("model", help="the serving models' versions: list them, or roll back one step")
    model.add_argument("action", choices=["list", "rollback"])
    model.add_argument("kind", choices=["embeddings", "ranker"])
    model.set_defaults(func=_cmd_model)

    neighbours = sub.add_parser("neighbours", help="a user's ANN neighbours in the embedding index, with cosine")
    neighbours.add_argument("user", type=int)
    neighbours.add_argument("--k", type=int, default=20)
    neighbours.add_argument("--json", action="store_true")
    neighbours.add_argument("--url", help="a worker's debug HTTP address (default: the settings' web host/port)")
    neighbours.set_defaults(func=_cmd_neighbours)

    refresh = sub.add_parser("refresh", help="recompute and publish lists now (after a model change, say)")
    who = refresh.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int)
    who.add_argument("--all", action="store_true")
    refresh.add_argument("--reembed", action="store_true", help="re-embed the users first (new GraphSAGE model)")
    refresh.add_argument("--embeddings-only", action="store_true", help="re-embed, publish no list")
    refresh.set_defaults(func=_cmd_refresh)

    soak = sub.add_parser("soak", help="steady synthetic load for minutes; samples worker RSS and lag into "
                                       "a CSV and a PNG")
    soak.add_argument("--rate", type=float, required=True, help="events per second")
    soak.add_argument("--minutes", type=float, required=True)
    soak.add_argument("--users", type=int, default=10_000, help="users of the synthetic network")
    soak.add_argument("--out", default="reports/soak", help="folder of the CSV, PNG and worker log")
    soak.add_argument("--features-only", action="store_true", help="a worker without embeddings and lists")
    soak.add_argument("--same-users", action="store_true",
                      help="every round a new network over the same user ids, replacing the previous round's "
                           "connections (a fixed population at a steady state), not new users")
    soak.set_defaults(func=_cmd_soak)

    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON object")
    bench.add_argument("what", choices=["ingest", "index", "rank", "freshness", "capacity", "hubs", "ann-shards"])
    bench.add_argument("--data", default=None,
                       help=FORMATS_HELP + " (default: ego-Facebook; capacity: ego-Facebook and CA-HepPh)")
    bench.add_argument("--partitions", type=int, default=None, help="capacity: partitions of the replay (12)")
    bench.add_argument("--lists-per-core", type=float, default=300.0,
                       help="capacity: lists per core-second to project with (pymk bench rank's full-served-1000)")
    bench.add_argument("--plot", type=Path, default=None, help="capacity: write the plot (PNG) here")
    bench.add_argument("--split", choices=["time", "random"], default="random",
                       help="hubs: the evaluation split of --data (default graphs: each its own)")
    bench.add_argument("--timeout", type=float, default=1800.0)
    bench.add_argument("--rate", type=float, default=1000.0, help="freshness: events per second")
    bench.add_argument("--seconds", type=float, default=30.0, help="freshness: how long to produce at that rate")
    bench.add_argument("--users", type=int, default=None,
                       help="freshness: users of the synthetic network (3,000); ann-shards: vectors (20,000)")
    bench.add_argument("--shards", type=int, default=3,
                       help="ann-shards: shard processes, each serving its partitions' users over HTTP")
    bench.add_argument("--workers", type=int, default=1,
                       help="freshness: worker processes in the consumer group (they share the partitions)")
    bench.add_argument("--ranker", default=None,
                       help="rank: time this saved model (e.g. data/models/ranker) instead of a fresh 500-tree one")
    bench.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    if getattr(args, "seed", None) is None and hasattr(args, "seed"):
        args.seed = settings.produce_seed
    from pymk.kafka_broker import BrokerError
    from pymk.ranking.model_store import TrainingRefused

    try:
        return int(args.func(args, settings) or 0)
    except (BrokerError, TrainingRefused) as exc:  # a clear refusal, not a traceback
        print(f"pymk {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
