"""The one settings object of pymk.

Every field can be overridden by an environment variable named ``PYMK_`` + the field name in upper case
(``PYMK_PARTITIONS=16``, ``PYMK_KAFKA_PORT=19092``). Settings are frozen: code that needs a variant builds
a new object with :func:`dataclasses.replace` (tests do this for per-test topic prefixes and ports).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import ssl
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "PYMK_"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")

# The enumerated settings: a value outside its choices is refused when the settings are built (from the
# environment or in code), so a typo never falls back to a default silently.
AnnSpace = Literal["sage", "two-tower"]
AnnMode = Literal["replicated", "sharded"]
GlobalsMode = Literal["replicated", "reachable"]
AnnQuantization = Literal["flat", "sq8"]
RankerKind = Literal["xgboost", "two-tower", "blend"]
RerankerKind = Literal["none", "cross-attention"]
TreeEvaluatorKind = Literal["auto", "xgboost"]
RefreshScope = Literal["touched", "two-hop"]
CommonCounts = Literal["materialised", "on-read"]


@dataclass(frozen=True)
class Settings:
    # --- Kafka broker (the local one started by `pymk kafka start`) ---
    kafka_version: str = "4.1.1"
    kafka_host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap_mb: int = 1024
    # Where the broker's jars are cached (shared by every checkout on the machine).
    kafka_cache_dir: Path = Path.home() / ".cache" / "pymk"
    # Broker data, logs and pid file; worker state. Relative paths are relative to the working directory.
    home: Path = Path(".pymk")
    # A bootstrap list for clients; empty means the local broker (kafka_host:kafka_port).
    bootstrap_servers: str = ""

    # --- Client security (producers, consumers, workers). PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL. ---
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    # --- Topics ---
    topic_prefix: str = "pymk"
    partitions: int = 8
    replication_factor: int = 1

    # --- Worker ---
    app_id: str = "pymk-worker"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # Messages larger than this are dead-lettered unparsed (bytes).
    max_message_bytes: int = 64 * 1024
    # Events stamped further than this into the future are rejected (clock skew tolerance).
    max_future_ms: int = 24 * 3600 * 1000

    # State is made durable (outputs, then RocksDB, then acks) at least this often, and after this many events.
    flush_interval_ms: int = 500
    flush_every_events: int = 20000
    # A worker that dies is replaced in the group after this long (faust's default is 60 s).
    session_timeout_s: float = 10.0
    # Items with more engagers than this stop counting towards co-engagement (0: no cap, exact).
    max_item_fanout: int = 0
    # Common-neighbour counts per (local user, 2-hop candidate): "materialised" keeps a row per user, updated at
    # every 2-path change (O(1) debug reads; up to ~deg² entries a user, rewritten at each change); "on-read"
    # keeps none and counts from the adjacency and the mirrors when asked (ranking reads the mirrors either way;
    # features/graph.py). A partition written in one mode converts when opened in the other.
    common_counts: CommonCounts = "materialised"
    # A user with more connections than this is a hub: no 2-path runs through it (not in the 2-hop candidates,
    # the counts, Adamic-Adar, the mutual connections), so an event at a hub fans out to no one's 2-hop and a
    # list never reads a hub's row. 0: no hubs. Needs PYMK_COMMON_COUNTS=on-read. Its effect on quality:
    # `pymk bench hubs` (docs/capacity.md).
    hub_degree: int = 0
    # Memory bounds of a worker that owns every partition (one owning fewer gets its share): feature rows cached
    # in Python (a partition whose cache outgrows 1/PYMK_PARTITIONS of this evicts its oldest rows down to 70 %
    # of it; they are read back from RocksDB), and RocksDB's block cache with the memtables charged to it, shared
    # by all of the worker's databases.
    state_cache_mb: int = 1024
    rocksdb_memory_mb: int = 256

    # Embed users and publish refreshed lists (off: a features-only worker, e.g. for the ingest benchmark).
    recommend: bool = True

    # --- Embeddings and the ANN index (index/) ---
    # A trained GraphSAGE model directory; empty: <home>/models/embeddings/current, else the shipped default.
    embedding_model: str = ""
    # A user whose neighbourhood or profile changed is re-embedded at most this often (wall clock); a new user is
    # embedded at the next flush whatever this says.
    reembed_min_interval_ms: int = 5_000
    # Re-embeddings per flush stop after this long (new users are embedded at once whatever it says); the rest
    # stay due, the longest due first at the next flush (at least one batch per flush, so none waits forever).
    embed_budget_ms: int = 100
    # torch threads of the worker's GraphSAGE forward passes: its batches are small and its cores shared, where
    # more than one thread mostly spin-waits (measured: docs/benchmarks.md, "Freshness at 200 events/s")
    embed_threads: int = 1
    # While lists are owed between flushes, re-embeddings of known users get this share of the time spent on lists
    # (new users are embedded before any list, whatever it says); 0: only when no list is owed or in a flush.
    reembed_share: float = 0.1
    # The space Stage 1's ANN searches: "sage" (GraphSAGE neighbours of the user's embedding) or "two-tower"
    # (candidate-tower vectors searched with the user's query-tower vector; needs a two-tower model).
    ann_space: AnnSpace = "sage"
    # "replicated": every worker's HNSW graph holds every user (one local search per list; the small-deployment
    # default). "sharded": a worker's graph holds the users of its own partitions only; Stage 1 asks every
    # worker's shard and merges (streams/ann_shards.py). Vectors stay replicated either way (the cosine columns).
    ann_mode: AnnMode = "replicated"
    # sharded: a peer's shard answer is awaited this long; without it the list is built from the shards that
    # answered (counted in /stats "ann_shards")
    ann_shard_timeout_ms: int = 2_000
    # sharded: the ANN answers of this many owed users are fetched from the shards in one request per peer,
    # before a slice (or flush) ranks them; the users not fetched wait for the next slice
    ann_shard_batch: int = 16
    # sharded: each shard is first asked for its likely share of a query's top k, k/S plus this many standard
    # deviations of a binomial share; a shard whose cut may hide a top-k user is asked again for the full k, so
    # the merge stays what asking every shard for k gives. 0: every shard asked for the full k at once.
    ann_shard_k_sigmas: float = 4.0
    # "replicated": every worker keeps every user's degree, activity and profile from the compacted user-globals
    # topic. "reachable": only those of the remote users its lists and embeddings have read, each fetched once
    # from its owner (POST /facts) and then kept current by the topic; a list that reads a user not yet held waits
    # for the next slice (streams/remote_facts.py). The topic is still read in full (the popular order).
    globals_mode: GlobalsMode = "replicated"
    # reachable: the owners' answers are awaited this long; the users not answered are asked again next slice
    globals_fetch_timeout_ms: int = 2_000
    # reachable: at most this many remote users held (the ones answered longest ago are dropped, and fetched again
    # when read); 0: no bound. Keep it well above one slice's candidates (thousands), or lists wait on each other.
    globals_held_max_users: int = 0
    # reachable: the popular order comes from each partition's this many most active users, published by its owner
    # (features/activity.py, MergedTops), instead of every user's degree record
    globals_popular_per_partition: int = 64
    ann_m: int = 32
    ann_ef_construction: int = 200
    ann_ef_search: int = 128
    # A search whose beam (ef_search, or k when larger) times this is at least the users it may return is answered
    # by brute force: exact, and cheaper than the graph walk there (index/ann.py AnnConfig). 0: always HNSW.
    ann_exact_search_factor: int = 64
    # "flat" (float32 vectors in the graph) or "sq8" (int8 scalar quantisation: a quarter of the memory)
    ann_quantization: AnnQuantization = "flat"
    # Rebuild the HNSW graph when this share of its slots hold replaced or deleted vectors.
    ann_rebuild_tombstone_fraction: float = 0.2
    # The worker snapshots its index this often (and at shutdown); a restart replays embeddings since then.
    index_snapshot_interval_s: float = 300.0

    # --- Candidates and ranking (ranking/) ---
    # A trained ranker directory; empty: <home>/models/ranker/current, else the shipped default.
    ranker_model: str = ""
    # What ranks Stage 2: "xgboost", "two-tower" (a trained two-tower model: PYMK_TWO_TOWER_MODEL or
    # <home>/models/two-tower/current) or "blend" ((1 - w)·XGBoost + w·two-tower, by rank within the list).
    ranker_kind: RankerKind = "xgboost"
    two_tower_model: str = ""
    blend_weight: float = 0.5
    # Stage 2 option C: "none" (default) or "cross-attention" (re-rank Stage 2's top 50 with the model at
    # PYMK_RERANKER_MODEL or <home>/models/reranker/current, in one batched forward pass per list).
    reranker: RerankerKind = "none"
    reranker_model: str = ""
    # How the ranker's trees are evaluated: "auto" (a C evaluator compiled once per machine with
    # tree_evaluator_cc and its flags, cached in tree_evaluator_cache_dir; XGBoost's inplace_predict when it cannot
    # be used, with the reason in /stats) or "xgboost" (always inplace_predict).
    tree_evaluator: TreeEvaluatorKind = "auto"
    tree_evaluator_cc: str = "gcc"
    tree_evaluator_cflags: str = "-O3 -march=native"
    tree_evaluator_cache_dir: Path = Path.home() / ".cache" / "pymk" / "tree-eval"
    # Workers check this often whether a model path now points at another version, and load it (hot reload).
    model_reload_interval_s: float = 5.0
    candidates_graph_k: int = 1000
    candidates_ann_k: int = 1000
    # the most active users by weekly connection activity, a third Stage 1 source ("popular"; 0 disables)
    candidates_popular_k: int = 100
    candidates_max: int = 2100
    recommendations_k: int = 20
    # Incremental lists (ranking/incremental.py): each ranked user's candidates and feature matrix are kept, LRU by
    # bytes up to list_cache_bytes per worker (0: off, every list takes the full path), and updated in place by the
    # next change instead of a new Stage 1; a full Stage 1 runs when the entry is older than list_cache_max_age_ms
    # (wall clock) or had list_cache_max_updates updates (what reaches it late, e.g. other users' embeddings,
    # is stale at most that long). shadow_fraction of the incremental lists (sampled by user and as-of time) are
    # recomputed fully and compared (the top k, ids in order): /stats lists.shadow. 1 GiB, the state cache's size
    # (state_cache_mb): a list of the default Stage 1 (~1,400 rows, at most 2,100) takes ~350 KB packed, ~530 KB
    # not, so it holds the lists of the ~2,000-3,000 users refreshed last; 256 MiB held ~600 (/memory list_cache).
    list_cache_bytes: int = 2**30
    list_cache_max_age_ms: int = 300_000
    list_cache_max_updates: int = 64
    # a kept list is built anew instead of updated when more than this share of its rows' reads moved (1: never)
    list_cache_max_changed_share: float = 0.5
    shadow_fraction: float = 0.02
    # Which users a change refreshes: "touched" (users whose own rows changed: both endpoints of a connection,
    # viewer and viewed, dismisser, engager, profile owner) or "two-hop" (also every user whose common-neighbour
    # row changed, i.e. the neighbours of both endpoints of a new connection).
    refresh_scope: RefreshScope = "touched"
    # Refreshing is done inside the flush; past this much time per flush the rest waits for the next one
    # (pending refreshes are durable, so a crash loses none). Lists owed are served in two lanes: the users
    # touched most recently first (newest last change first), and, with up to refresh_stale_share of the budget
    # and before them, the users whose oldest unanswered change is refresh_max_staleness_ms old or more (oldest
    # first), so under overload nobody waits forever: load beyond the budget is shed to that lane, not dropped.
    refresh_budget_ms: int = 250
    refresh_max_staleness_ms: int = 60_000
    refresh_stale_share: float = 0.5
    # The budget of a flush that follows an interval without any input (the load dropped): the backlog drains.
    refresh_idle_budget_ms: int = 400
    # With more input messages than this not applied yet, a flush ranks one list and re-embeds one batch: the
    # input catches up first (a list ranked on state that is behind is stale when it is published).
    refresh_catch_up_backlog: int = 1000
    # While the input keeps up (at most refresh_keeping_up_backlog messages not applied at a flush) the lists'
    # budget grows by half per flush up to refresh_budget_max_ms: the time the input does not need goes to lists.
    # Past it the budget halves back toward refresh_budget_ms (additive-free AIMD on the input backlog).
    refresh_keeping_up_backlog: int = 300
    refresh_budget_max_ms: int = 1500
    # Between flushes, the outboxes are sent and owed lists are ranked in slices of about this long, each sent at
    # once, so a list does not wait for the next flush nor for the end of one; only while the worker has applied
    # all the input it knows of. 0: both wait for the flushes (at 20 events/s, p99 6.1 s instead of 1.2 s).
    refresh_between_flushes_ms: int = 25
    # What survives a full garbage collection is frozen (streams/gc_pauses.py), so later collections do not walk
    # the row caches again and again (each full one stopped the worker for ~260 ms); every this many seconds the
    # frozen objects are collected once more (cyclic garbage among them). 0: the collector as Python sets it.
    gc_unfreeze_interval_s: float = 600.0
    # A dismissed candidate comes back after this long (0: never).
    dismissal_expiry_ms: int = 0
    # Per published list, this many candidates that were scored but not shown are logged too (rank 0), so a
    # ranker retrained from the impressions learns about the whole candidate pool, not only the shown top.
    impressions_unshown_sample: int = 60
    # Half of that sample comes from the unshown candidates ranked just below the list (ranks k+1 .. this), the
    # candidates a retrained model would promote; the other half from the rest of the pool. Each row carries
    # the weight of its stratum (how many candidates it stands for).
    impressions_unshown_near_ranks: int = 100
    # Label horizon of the ranker's training data (event time).
    label_horizon_ms: int = 14 * 24 * 3600 * 1000

    # --- Producer ---
    produce_seed: int = 7

    def __post_init__(self) -> None:
        # One spelling for every client (faust, aiokafka, kafka-python); an unknown protocol fails here, clearly,
        # instead of at the first connection with an unrelated message.
        protocol = self.security_protocol.strip().upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"security protocol {self.security_protocol!r} (PYMK_SECURITY_PROTOCOL) is not one of "
                             f"{', '.join(SECURITY_PROTOCOLS)}")
        object.__setattr__(self, "security_protocol", protocol)
        for name, choices in _enumerated().items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={getattr(self, name)!r} is not one of "
                                 f"{', '.join(choices)}")
        if self.hub_degree and self.common_counts != "on-read":
            raise ValueError(f"{ENV_PREFIX}HUB_DEGREE={self.hub_degree} needs {ENV_PREFIX}COMMON_COUNTS=on-read")

    # Derived names -----------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"{self.kafka_host}:{self.kafka_port}"

    def topic(self, name: str) -> str:
        """Full topic name for a short name such as ``connections`` (``pymk.connections`` by default)."""
        return f"{self.topic_prefix}.{name}"

    @property
    def input_topics(self) -> dict[str, str]:
        """Short event kind → topic name, for the five input topics of the contract."""
        return {kind: self.topic(kind) for kind in INPUT_KINDS}

    @property
    def broker_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def worker_dir(self) -> Path:
        return self.home / "worker"

    @property
    def model_dir(self) -> Path:
        return self.home / "models"

    def kafka_client_config(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python and aiokafka clients (same names in both)."""
        config: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            config.update(
                sasl_mechanism=self.sasl_mechanism or "PLAIN",
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, key):
                    config[key] = getattr(self, key)
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for SSL and SASL_SSL (aiokafka and faust take a context, not file names)."""
        if not self.security_protocol.endswith("SSL"):
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return context

    def aiokafka_client_config(self) -> dict[str, Any]:
        """:meth:`kafka_client_config` for aiokafka: the ``ssl_*`` file names become an ``ssl_context``."""
        config = {k: v for k, v in self.kafka_client_config().items() if not k.startswith("ssl_")}
        if self.security_protocol.endswith("SSL"):
            config["ssl_context"] = self.ssl_context()
        return config

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``PYMK_*`` environment variables, then explicit keyword overrides."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(hints[f.name], raw, f.name)
        values.update(overrides)
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process."""
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    def redacted(self) -> dict[str, Any]:
        """Settings for logs and debug output: secrets are masked."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for secret in ("sasl_password",):
            if out[secret]:
                out[secret] = "***"
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


INPUT_KINDS = ("connections", "profile-views", "dismissals", "engagements", "users")
OUTPUT_KINDS = ("recommendations", "impressions", "dead-letter")


@functools.cache
def _enumerated() -> dict[str, tuple[str, ...]]:
    """Each Literal-typed setting → its choices."""
    hints = typing.get_type_hints(Settings)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(Settings)
            if typing.get_origin(hints[f.name]) is Literal}


def _coerce(kind: Any, raw: str, name: str) -> Any:
    if typing.get_origin(kind) is Literal:
        return raw  # checked with the others in Settings.__post_init__
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, float, str, Path):
            return kind(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from exc
    raise TypeError(f"setting {name} has unsupported type {kind}")


def settings_env_names() -> set[str]:
    """Every environment variable the settings object reads (the docker-compose test checks against it)."""
    return {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
