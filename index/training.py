"""Training the GraphSAGE user model on a connection history (link prediction, in-batch sampled softmax).

- **Time split without leakage.** Connections are sorted by ts; the last ``val_fraction`` of them are the
  validation period (all connections sharing the first validation ts go to validation, so message passing
  is strictly before it). Validation embeds users on the graph of training connections only, and
  :func:`assert_no_leakage` raises if a validation pair is in that graph.
- **Mini-batches.** Each step samples seed edges, expands their endpoints (and the extra negatives) two
  hops by neighbour sampling on the training graph, and runs the model on that mini-graph only; the seed
  edges themselves are hidden from the sampler and from the degrees, as future edges are at validation.
- **Loss.** For positive pairs (a_i, b_i): logits = a·bᵀ/τ over the batch (and extra negatives),
  cross-entropy on the diagonal, both directions. Known edges among the negatives are masked out.
- **Negative curriculum** (epochs split in thirds): uniform random extra negatives (the in-batch ones are
  degree-biased), then extra negatives ∝ degree^0.75, then the same plus the hardest in-batch/extra
  negatives of each row weighted up (logit + log w).
- AdamW with cosine decay per step, early stopping on validation AUC (the best epoch's weights are kept).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pymk.events import Profile
from pymk.index.embedder import Embedder
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.node_features import DEGREE_SLICE, NodeFeatureSource, encode_degrees, encode_profile_part
from pymk.index.sage import GraphSage, SageBatch, SageConfig, make_batch, make_version, save_model
from pymk.index.sampling import NeighbourSource, sample_subgraph
from pymk.learning import LeakageError, roc_auc_of

CURVE_FILE = "training_curve.png"
_MASKED = -1e9  # logit of a masked negative (finite: -inf would give NaN gradients on fully masked rows)


@dataclass(frozen=True)
class EmbeddingTrainingConfig:
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 3  # epochs without a better validation AUC before stopping
    temperature: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    max_steps_per_epoch: int = 40  # bounds CPU time: CollegeMsg's ~10k training edges are ~20 steps anyway
    hidden_dim: int = 256
    embedding_dim: int = 128
    layers: int = 2
    fanout: tuple[int, ...] = field(default=(10, 10))
    dropout: float = 0.3
    identity_dim: int = 32
    extra_negatives: int = 256  # per batch, random (phase 1) or ∝ degree^degree_power (phases 2, 3)
    degree_power: float = 0.75
    hard_negatives: int = 8  # per row, in phase 3
    hard_negative_weight: float = 3.0  # softmax weight of a hard negative relative to the others
    max_val_edges: int = 20_000  # a random subset of the validation edges beyond this (bounds time)
    min_delta: float = 1e-4  # an AUC gain below this is no improvement
    progress: bool = True
    threads: int | None = None  # torch threads while training (None: leave unchanged)

    def sage_config(self, input_dim: int) -> SageConfig:
        return SageConfig(input_dim=input_dim, hidden_dim=self.hidden_dim, embedding_dim=self.embedding_dim,
                          layers=self.layers, fanout=self.fanout, dropout=self.dropout,
                          identity_dim=self.identity_dim)

    def phase(self, epoch: int) -> int:
        return curriculum_phase(epoch, self.epochs)


def curriculum_phase(epoch: int, epochs: int) -> int:
    """The negatives' curriculum phase of a 0-based epoch out of ``epochs`` (GraphSAGE's and the two towers'):
    0 random, 1 degree-weighted, 2 hard negatives, a third of the epochs each."""
    return min(2, epoch * 3 // max(1, epochs))


@dataclass
class TrainingResult:
    model: GraphSage
    metadata: dict[str, Any]
    model_dir: Path
    curve_png: Path
    history: list[dict[str, float]]


# ---- split and leakage guard -----------------------------------------------------------------------------------
def split_by_time(connections: Iterable[tuple[int, int, int]], val_fraction: float
                  ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(train, validation): connections sorted by ts (stable), first occurrence of each unordered pair,
    no self-loops; validation is the last ``val_fraction`` plus any earlier edge sharing its first ts."""
    seen: set[tuple[int, int]] = set()
    ordered: list[tuple[int, int, int]] = []
    for u, v, ts in sorted(connections, key=lambda edge: edge[2]):
        pair = (u, v) if u < v else (v, u)
        if u != v and pair not in seen:
            seen.add(pair)
            ordered.append((int(u), int(v), int(ts)))
    if len(ordered) < 2:
        raise ValueError("need at least two distinct connections")
    cut = len(ordered) - max(1, math.ceil(val_fraction * len(ordered)))
    start_ts = ordered[cut][2]
    while cut > 0 and ordered[cut - 1][2] == start_ts:
        cut -= 1
    if cut == 0:
        raise ValueError("every connection falls in the validation period (timestamps all equal?)")
    return ordered[:cut], ordered[cut:]


def assert_no_leakage(graph: NeighbourSource, validation_edges: Iterable[Sequence[int]],
                      message_passing_edges: Sequence[tuple[int, int, int]] | None = None) -> None:
    """Raise :class:`LeakageError` if a validation pair is an edge of the message-passing ``graph`` or, when
    the message-passing edges with their ts are given, if any of them is not strictly before the
    validation period."""
    first_val_ts: int | None = None
    for edge in validation_edges:
        u, v = int(edge[0]), int(edge[1])
        if v in graph.neighbours(u) or u in graph.neighbours(v):
            raise LeakageError(f"validation edge ({u}, {v}) is in the message-passing graph")
        if len(edge) > 2:
            first_val_ts = int(edge[2]) if first_val_ts is None else min(first_val_ts, int(edge[2]))
    if message_passing_edges and first_val_ts is not None:
        last = max(ts for _, _, ts in message_passing_edges)
        if last >= first_val_ts:
            raise LeakageError(f"message passing uses an edge at ts {last}, not before the validation "
                               f"period (from ts {first_val_ts})")


# ---- AUC ---------------------------------------------------------------------------------------------------
def sample_non_edges(positive_pairs: Sequence[tuple[int, int]], candidates: np.ndarray,
                     known_edges: set[tuple[int, int]], seed: int) -> list[tuple[int, int]]:
    """One random non-edge (u, w) per positive (u, v): w uniform over ``candidates``, never u, never a
    known edge (so a negative is a pair that did not connect, as far as the data says)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    for u, _ in positive_pairs:
        for _attempt in range(100):
            w = int(candidates[rng.integers(candidates.shape[0])])
            if w != u and ((u, w) if u < w else (w, u)) not in known_edges:
                out.append((u, w))
                break
    return out


def validation_auc(model: GraphSage, graph: NeighbourSource, features: NodeFeatureSource,
                   positive_pairs: Sequence[Sequence[int]], negative_pairs: Sequence[tuple[int, int]],
                   salt: int = 0, seen: set[int] | None = None) -> dict[str, float]:
    """AUC of held-out future edges against non-edges, scored by the dot product of embeddings computed on
    ``graph`` (the pre-validation graph: checked by :func:`assert_no_leakage`). Returns ``auc``, and
    ``auc_seen`` over the pairs whose endpoints are both in ``seen`` (users of the training graph)."""
    assert_no_leakage(graph, positive_pairs)
    was_training = model.training
    try:
        users = np.unique(np.array([(p[0], p[1]) for p in positive_pairs] + list(negative_pairs),
                                   dtype=np.int64).reshape(-1))
        vectors = Embedder(model, features, graph).embed(users, salt)
    finally:
        model.train(was_training)
    row = {int(user): i for i, user in enumerate(users.tolist())}

    def scores(pairs: Sequence[Sequence[int]]) -> np.ndarray:
        a = vectors[[row[int(p[0])] for p in pairs]]
        b = vectors[[row[int(p[1])] for p in pairs]]
        return np.einsum("ij,ij->i", a, b)

    positive, negative = scores(positive_pairs), scores(negative_pairs)
    result = {"auc": roc_auc_of(positive, negative)}
    if seen is not None:
        pos_seen = np.array([int(p[0]) in seen and int(p[1]) in seen for p in positive_pairs], dtype=bool)
        neg_seen = np.array([int(p[0]) in seen and int(p[1]) in seen for p in negative_pairs], dtype=bool)
        result["auc_seen"] = roc_auc_of(positive[pos_seen], negative[neg_seen])
    return result


# ---- the training graph ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingBatch:
    batch: SageBatch  # tensors of the sampled mini-graph only
    a_rows: torch.Tensor  # rows of the roots' embeddings: positive pairs (a_i, b_i), extra negatives
    b_rows: torch.Tensor
    negative_rows: torch.Tensor
    a: np.ndarray  # positions (in TrainingGraph) of the same nodes
    b: np.ndarray
    negatives: np.ndarray


class TrainingGraph:
    """The training connections as CSR arrays over positions 0..N-1 (sorted user ids), with the profile
    part of every node's features precomputed; samples mini-batches for :func:`train_embeddings`."""

    def __init__(self, edges: Sequence[tuple[int, int, int]] | Sequence[tuple[int, int]],
                 profiles: Mapping[int, Profile] | None, fanout: Sequence[int], identity_dim: int) -> None:
        pairs = np.array([(e[0], e[1]) for e in edges], dtype=np.int64).reshape(-1, 2)
        self.ids = np.unique(pairs)
        self.size = int(self.ids.shape[0])
        self.src = np.searchsorted(self.ids, pairs[:, 0])
        self.dst = np.searchsorted(self.ids, pairs[:, 1])
        both_src = np.concatenate([self.src, self.dst])
        both_dst = np.concatenate([self.dst, self.src])
        order = np.lexsort((both_dst, both_src))
        self.indices = both_dst[order]
        self.degree = np.bincount(both_src, minlength=self.size).astype(np.int64)
        self.indptr = np.zeros(self.size + 1, dtype=np.int64)
        np.cumsum(self.degree, out=self.indptr[1:])
        self.edge_codes = np.sort(self.pair_codes(self.src, self.dst))
        self.fanout = tuple(fanout)
        self.identity_dim = identity_dim
        profiles = profiles or {}
        encoded: dict[Profile | None, np.ndarray] = {}
        rows = []
        for user in self.ids.tolist():
            profile = profiles.get(user)
            if profile not in encoded:
                encoded[profile] = encode_profile_part(profile)
            rows.append(encoded[profile])
        self.profile_part = np.stack(rows)
        weights = self.degree.astype(np.float64) ** 0.75
        self._degree_weights = weights / weights.sum()

    def pair_codes(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """One int64 per unordered pair of positions."""
        return np.minimum(u, v) * self.size + np.maximum(u, v)

    def is_edge(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        codes = self.pair_codes(u, v)
        found = np.searchsorted(self.edge_codes, codes)
        return self.edge_codes[np.minimum(found, self.edge_codes.shape[0] - 1)] == codes

    def degree_weighted(self, count: int, power: float, rng: np.random.Generator) -> np.ndarray:
        if power == 0.75:
            probabilities = self._degree_weights
        else:
            weights = self.degree.astype(np.float64) ** power
            probabilities = weights / weights.sum()
        return rng.choice(self.size, size=count, p=probabilities)

    def _fetch(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.degree[nodes]
        starts = self.indptr[nodes]
        total = int(lengths.sum())
        # Position of every entry: its list's start plus its rank within the list.
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return lengths, self.indices[offsets + np.arange(total, dtype=np.int64)]

    def sample_batch(self, a: np.ndarray, b: np.ndarray, negatives: np.ndarray, salt: int) -> TrainingBatch:
        """Mini-graph around the endpoints of positive pairs (a_i, b_i) (positions) and the extra negatives,
        with the positive edges hidden from sampling and degrees."""
        hidden_codes = np.unique(self.pair_codes(a, b))

        def keep(owners: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> np.ndarray:
            return ~np.isin(self.pair_codes(np.repeat(owners, lengths), flat), hidden_codes)

        roots = np.unique(np.concatenate([a, b, negatives]))
        subgraph = sample_subgraph(roots, self._fetch, self.fanout, salt, exclude=keep)
        nodes = subgraph.node_ids
        # The positives are training edges, so each hidden code is one edge to take off both degrees.
        removed = np.bincount(np.concatenate([hidden_codes // self.size, hidden_codes % self.size]),
                              minlength=self.size)
        x = self.profile_part[nodes]  # fancy indexing: a copy
        x[:, DEGREE_SLICE] = encode_degrees(self.degree[nodes] - removed[nodes])
        batch = make_batch(replace(subgraph, node_ids=self.ids[nodes]), x, self.identity_dim)

        def rows(positions: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.searchsorted(roots, positions))  # roots are sorted and come first

        return TrainingBatch(batch, rows(a), rows(b), rows(negatives), a, b, negatives)


# ---- loss ------------------------------------------------------------------------------------------------------
def _negative_mask(graph: TrainingGraph, anchors: np.ndarray, positives: np.ndarray,
                   candidates: np.ndarray) -> torch.Tensor:
    """Bool [B, C]: candidate j is not a valid negative of row i (it is the anchor, the row's positive, or a
    known neighbour of the anchor). Column i of the first B columns is the positive itself: left False."""
    anchor = anchors[:, None]
    invalid = (candidates[None, :] == anchor) | (candidates[None, :] == positives[:, None])
    invalid |= graph.is_edge(np.broadcast_to(anchor, invalid.shape), np.broadcast_to(candidates, invalid.shape))
    diagonal = np.arange(anchors.shape[0])
    invalid[diagonal, diagonal] = False
    return torch.from_numpy(invalid)


def contrastive_loss(anchor: torch.Tensor, candidates: torch.Tensor, invalid: torch.Tensor, temperature: float,
                     hard_negatives: int = 0, hard_weight: float = 1.0) -> torch.Tensor:
    """Sampled softmax: row i's positive is candidate i. ``hard_negatives`` > 0 adds log(hard_weight) to the
    top-k valid negative logits of each row (weighting hard negatives up in the softmax denominator)."""
    logits = anchor @ candidates.T / temperature
    logits = logits.masked_fill(invalid, _MASKED)
    rows = torch.arange(anchor.shape[0])
    if hard_negatives > 0 and hard_weight != 1.0:
        ranking = logits.detach().clone()
        ranking[rows, rows] = _MASKED  # the positive is no negative
        k = min(hard_negatives, ranking.shape[1] - 1)
        top = ranking.topk(k, dim=1).indices
        boost = torch.zeros_like(logits)
        boost.scatter_(1, top, math.log(hard_weight))
        boost = boost.masked_fill(invalid, 0.0)
        boost[rows, rows] = 0.0
        logits = logits + boost
    return F.cross_entropy(logits, rows)


# ---- training ----------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="train sage", unit="step", file=sys.stderr, leave=False)


def _plot_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_axis.set(title="training loss (sampled softmax)", xlabel="epoch", ylabel="loss")
    auc_axis.plot(epochs, [h["val_auc"] for h in history], marker="o", label="all validation pairs")
    if any("val_auc_seen" in h for h in history):
        auc_axis.plot(epochs, [h.get("val_auc_seen", float("nan")) for h in history], marker=".",
                      label="both users in the training graph")
    auc_axis.set(title="validation AUC (future edges vs non-edges)", xlabel="epoch", ylabel="AUC")
    auc_axis.legend()
    for previous, current in zip(history, history[1:], strict=False):
        if current["phase"] == previous["phase"]:
            continue
        boundary = current["epoch"] - 0.5
        for axis in (loss_axis, auc_axis):
            axis.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train_embeddings(connections: Sequence[tuple[int, int, int]], profiles: Mapping[int, Profile] | None,
                     out_dir: Path | str, config: EmbeddingTrainingConfig | None = None,
                     version_time: datetime | None = None) -> TrainingResult:
    """Train a :class:`GraphSage` on ``connections`` ((u, v, ts), any order) and the optional ``profiles``;
    save it to ``out_dir/<version>/`` with ``metadata.json`` and the training curve. Same inputs and seed give
    the same weights (:func:`pymk.reproducible.deterministic`). ``version_time``: the time stamped into the
    version (default: now); pass a fixed one where the version must be reproducible too, since embeddings are
    sampled with a salt derived from the version (:func:`pymk.index.embedder.salt_for_version`)."""
    from pymk.reproducible import deterministic

    config = config or EmbeddingTrainingConfig()
    started = time.perf_counter()
    with deterministic(config.seed, config.threads):
        return _train(connections, profiles, Path(out_dir), config, started, version_time)


def _train(connections: Sequence[tuple[int, int, int]], profiles: Mapping[int, Profile] | None, out_dir: Path,
           config: EmbeddingTrainingConfig, started: float, version_time: datetime | None = None) -> TrainingResult:
    rng = np.random.default_rng(config.seed)
    train_edges, val_edges = split_by_time(connections, config.val_fraction)
    graph = TrainingGraph(train_edges, profiles, config.fanout, config.identity_dim)
    model = GraphSage(config.sage_config(graph.profile_part.shape[1]))

    # Validation: future edges on the pre-validation graph, against random non-edges of the same users.
    val_graph = AdjacencyGraph(((u, v) for u, v, _ in train_edges), profiles)
    assert_no_leakage(val_graph, val_edges, train_edges)
    if len(val_edges) > config.max_val_edges:
        chosen = np.sort(rng.choice(len(val_edges), config.max_val_edges, replace=False))
        val_edges = [val_edges[i] for i in chosen]
    val_pairs = [(u, v) if rng.random() < 0.5 else (v, u) for u, v, _ in val_edges]
    known = {(min(u, v), max(u, v)) for u, v, _ in train_edges} | {(min(u, v), max(u, v)) for u, v in val_pairs}
    candidates = np.unique(np.concatenate([graph.ids, np.array(val_pairs, dtype=np.int64).reshape(-1)]))
    negative_pairs = sample_non_edges(val_pairs, candidates, known, config.seed + 1)
    seen = set(graph.ids.tolist())

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, min(config.max_steps_per_epoch, math.ceil(graph.src.shape[0] / config.batch_size)))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    bar = _progress(config.epochs * steps_per_epoch, config.progress)
    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state, stale = -1.0, 0, copy.deepcopy(model.state_dict()), 0
    max_batch_nodes = 0
    order = rng.permutation(graph.src.shape[0])
    cursor = 0
    for epoch in range(config.epochs):
        phase = config.phase(epoch)
        model.train()
        epoch_started, losses = time.perf_counter(), []
        for _ in range(steps_per_epoch):
            if cursor + config.batch_size > order.shape[0]:  # epochs may be capped: keep walking the edges
                order, cursor = rng.permutation(graph.src.shape[0]), 0
            picked = order[cursor:cursor + config.batch_size]
            cursor += config.batch_size
            flip = rng.random(picked.shape[0]) < 0.5
            a = np.where(flip, graph.dst[picked], graph.src[picked])
            b = np.where(flip, graph.src[picked], graph.dst[picked])
            if phase == 0:
                negatives = rng.integers(0, graph.size, config.extra_negatives)
            else:
                negatives = graph.degree_weighted(config.extra_negatives, config.degree_power, rng)
            sampled = graph.sample_batch(a, b, negatives, salt=int(rng.integers(1 << 62)))
            max_batch_nodes = max(max_batch_nodes, sampled.batch.num_nodes)
            embeddings = model(sampled.batch)
            emb_a, emb_b = embeddings[sampled.a_rows], embeddings[sampled.b_rows]
            emb_negative = embeddings[sampled.negative_rows]
            hard = config.hard_negatives if phase == 2 else 0
            loss = 0.5 * (
                contrastive_loss(emb_a, torch.cat([emb_b, emb_negative]),
                                 _negative_mask(graph, a, b, np.concatenate([b, negatives])),
                                 config.temperature, hard, config.hard_negative_weight)
                + contrastive_loss(emb_b, torch.cat([emb_a, emb_negative]),
                                   _negative_mask(graph, b, a, np.concatenate([a, negatives])),
                                   config.temperature, hard, config.hard_negative_weight))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", best_auc=f"{best_auc:.3f}")
        val = validation_auc(model, val_graph, val_graph, val_pairs, negative_pairs, salt=config.seed, seen=seen)
        record = {"epoch": epoch + 1, "phase": phase, "loss": float(np.mean(losses)), "val_auc": val["auc"],
                  "val_auc_seen": val.get("auc_seen", float("nan")),
                  "lr": float(optimizer.param_groups[0]["lr"]), "seconds": time.perf_counter() - epoch_started}
        history.append(record)
        if bar is None and config.progress:
            print(f"epoch {epoch + 1}/{config.epochs} phase {phase} loss {record['loss']:.4f} "
                  f"val AUC {record['val_auc']:.4f}", file=sys.stderr)
        if val["auc"] > best_auc + config.min_delta:
            best_auc, best_epoch, best_state, stale = val["auc"], epoch + 1, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if bar is not None:
        bar.close()

    model.load_state_dict(best_state)
    model.eval()
    model.version = make_version(model, version_time)
    model_dir = out_dir / model.version
    wall = time.perf_counter() - started
    metadata: dict[str, Any] = {
        "version": model.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hyper_parameters": asdict(config),
        "train_edges": len(train_edges),
        "train_users": graph.size,
        "val_edges": len(val_edges),
        "val_negatives": len(negative_pairs),
        "val_start_ts": val_edges[0][2] if val_edges else None,
        "train_end_ts": train_edges[-1][2],
        "best_val_auc": best_auc,
        "best_val_auc_seen": next(h["val_auc_seen"] for h in history if h["epoch"] == best_epoch),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": len(history) < config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "max_batch_nodes": max_batch_nodes,
        "wall_seconds": round(wall, 3),
        "history": history,
    }
    metadata = save_model(model, model_dir, metadata)
    curve = model_dir / CURVE_FILE
    _plot_curve(history, curve)
    return TrainingResult(model, metadata, model_dir, curve, history)
