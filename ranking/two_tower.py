"""Two-tower ranker over frozen GraphSAGE embeddings (issue #8): model, losses, training, serving helpers.

**Towers.** Input of a user (:func:`tower_inputs`, 176 float32) = its GraphSAGE embedding (128, zeros when it
has none) ‖ :func:`~pymk.index.node_features.encode_profile_compact` (32) ‖ activity (16: degree features and
profile flags, as :func:`~pymk.index.node_features.encode_activity`). Each tower is FC(176,256)+BN+ReLU →
FC(256,128)+BN+ReLU → FC(128,64) → L2-normalise; the query tower embeds the user asking, the candidate tower
the users it may connect to (separate weights: "who I reach out to" and "who gets reached" need not match).
Connections are undirected, so every training pair is used in a random direction.

**Score and probability.** ``score(u, v) = dot(query(u), candidate(v))`` ∈ [-1, 1] is what ranks. The losses see
``scale · score`` with a learned ``scale`` (log-parameterised, initialised at 1/0.1, clipped to ``max_scale``;
for B1 also a learned bias). Since B2's softmax is shift-invariant and B3 ignores the scale, neither yields a
calibrated probability, so for every loss ``P(connect) = sigmoid(a · score + b)`` with (a, b) fitted after
training on the validation pairs (Platt scaling; positives and sampled non-edges 1:1, so it is calibrated
for a balanced prior: use it to blend and threshold, not as an absolute rate).

**Losses** (``TwoTowerConfig.loss``):
- ``B1`` binary cross-entropy, balanced: each positive pair with one negative of the same query user.
- ``B2`` (default) in-batch sampled softmax: row i's positive is candidate i; the other rows' candidates and
  ``extra_negatives`` sampled users are the negatives; known edges among them are masked.
- ``B3`` triplet ``max(0, margin - s⁺ + s⁻)`` on the dot products.
Negative curriculum (epochs in thirds, as GraphSAGE's): uniform random users → users ∝ degree^0.75 → hard:
B2 weights the top-k in-batch/extra negatives of each row up (logit + log w), B1 and B3 take each row's
hardest negative by the model's own current scores. Early stopping on validation AUC (best epoch kept) only in the
last (hard) phase: every phase runs at least once, and the patience counter restarts at each phase change,
since the objective changes there.

**No leakage.** The embeddings are inputs and frozen, so they must not see the pairs they are asked to score.
Training examples come from *snapshots*: the message-passing graph is a set of training edges, the positives
are other training edges that are not in it (time split: edges after a checkpoint, the graph strictly before
it; random split: k folds of held-out edges). Validation: the last ``val_fraction`` of the training
connections (time) or a random share (random), scored on the graph of all training connections. Every
snapshot and the validation graph go through :func:`pymk.index.training.assert_no_leakage`, and with a time
split the GraphSAGE model must have been trained on connections strictly before the validation period
(:func:`check_sage_before`, from its ``metadata.json``); both raise :class:`LeakageError`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pymk import model_artifact
from pymk.events import Profile
from pymk.index.embedder import Embedder, salt_for_version
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.node_features import (
    ACTIVITY_FEATURE_DIM,
    FEATURE_VERSION,
    PROFILE_FEATURE_DIM,
    encode_degrees,
    encode_profile_compact,
    profile_flags,
)
from pymk.index.sage import MIN_STABLE_ROWS, GraphSage, load_model
from pymk.index.training import assert_no_leakage, curriculum_phase, sample_non_edges, split_by_time
from pymk.learning import LeakageError, roc_auc_of
from pymk.ranking.source import EMBEDDING_DIM

Loss = Literal["B1", "B2", "B3"]
SplitKind = Literal["time", "random"]
LOSSES: tuple[str, ...] = ("B1", "B2", "B3")
INPUT_DIM = EMBEDDING_DIM + PROFILE_FEATURE_DIM + ACTIVITY_FEATURE_DIM  # 176
CURVE_FILE = "training_curve.png"
_MASKED = -1e9  # logit of a masked negative (finite: -inf gives NaN gradients on fully masked rows)


# ---- inputs -----------------------------------------------------------------------------------------------------
class TowerFeatureSource(Protocol):
    """What :func:`tower_inputs` reads (a :class:`~pymk.ranking.source.RankingSource` is one). A source may
    also define ``embeddings(users) -> (n, 128)`` with NaN rows for users without one (read in one call)."""

    def embedding(self, user: int) -> np.ndarray | None: ...

    def profile(self, user: int) -> Profile | None: ...

    def degree(self, user: int) -> int: ...


@lru_cache(maxsize=1 << 16)
def _profile_part(profile: Profile | None) -> np.ndarray:
    """Compact profile (32) ‖ profile flags (6), read-only; cached by value (frozen dataclass)."""
    encoded = np.concatenate([encode_profile_compact(profile), profile_flags(profile)])
    encoded.setflags(write=False)
    return encoded


_EMBEDDING = slice(0, EMBEDDING_DIM)
_PROFILE = slice(EMBEDDING_DIM, EMBEDDING_DIM + PROFILE_FEATURE_DIM)
_DEGREE = slice(EMBEDDING_DIM + PROFILE_FEATURE_DIM, EMBEDDING_DIM + PROFILE_FEATURE_DIM + 10)
_FLAGS = slice(_DEGREE.stop, INPUT_DIM)


def tower_inputs(users: Sequence[int] | np.ndarray, source: TowerFeatureSource) -> np.ndarray:
    """float32 ``(n, 176)`` tower inputs: embedding (zeros without one) ‖ compact profile ‖ activity."""
    ids = [int(user) for user in np.asarray(users, dtype=np.int64).reshape(-1)]
    out = np.zeros((len(ids), INPUT_DIM), dtype=np.float32)
    if not ids:
        return out
    batch_embeddings = getattr(source, "embeddings", None)
    if batch_embeddings is not None:
        vectors = np.asarray(batch_embeddings(ids), dtype=np.float32)
        out[:, _EMBEDDING] = np.nan_to_num(vectors, nan=0.0)
    else:
        for row, user in enumerate(ids):
            vector = source.embedding(user)
            if vector is not None:
                out[row, _EMBEDDING] = vector
    parts = np.stack([_profile_part(source.profile(user)) for user in ids])
    out[:, _PROFILE] = parts[:, :PROFILE_FEATURE_DIM]
    out[:, _FLAGS] = parts[:, PROFILE_FEATURE_DIM:]
    out[:, _DEGREE] = encode_degrees(np.fromiter((source.degree(user) for user in ids), np.int64, len(ids)))
    return out


# ---- model -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerConfig:
    input_dim: int = INPUT_DIM
    hidden_dims: tuple[int, int] = (256, 128)
    output_dim: int = 64
    initial_scale: float = 10.0  # 1 / temperature 0.1
    learn_scale: bool = True
    max_scale: float = 100.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(d) for d in self.hidden_dims))
        if len(self.hidden_dims) != 2 or min(self.hidden_dims) < 1 or self.output_dim < 1:
            raise ValueError("two hidden sizes and a positive output size")
        if not 0.0 < self.initial_scale <= self.max_scale:
            raise ValueError("need 0 < initial_scale <= max_scale")


class Tower(nn.Module):
    """FC+BN+ReLU → FC+BN+ReLU → FC → L2-normalise."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        first, second = config.hidden_dims
        self.layers = nn.Sequential(
            nn.Linear(config.input_dim, first), nn.BatchNorm1d(first), nn.ReLU(),
            nn.Linear(first, second), nn.BatchNorm1d(second), nn.ReLU(),
            nn.Linear(second, config.output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), dim=1)


class TwoTowerModel(nn.Module):
    def __init__(self, config: TowerConfig | None = None) -> None:
        super().__init__()
        self.config = config or TowerConfig()
        self.query = Tower(self.config)
        self.candidate = Tower(self.config)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.config.initial_scale)),
                                      requires_grad=self.config.learn_scale)
        self.bias = nn.Parameter(torch.zeros(()))  # B1's logit offset (the softmax and triplet ignore it)
        self.version: str | None = None
        self.calibration: tuple[float, float] = (self.config.initial_scale, 0.0)  # (a, b) of P(connect)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.config.max_scale)

    def _vectors(self, tower: Tower, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Eval-mode vectors; in eval mode BatchNorm uses its running statistics, so a row's output does not
        depend on the batch, and short batches are padded (MKL's small-M kernels round differently)."""
        self.eval()
        x = torch.as_tensor(np.ascontiguousarray(inputs, dtype=np.float32)).reshape(-1, self.config.input_dim)
        rows = x.shape[0]
        if 0 < rows < MIN_STABLE_ROWS:
            x = torch.cat([x, x.new_zeros(MIN_STABLE_ROWS - rows, x.shape[1])])
        with torch.inference_mode():
            return tower(x)[:rows].numpy()

    def query_vectors(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """float32 ``(n, 64)`` unit query vectors of ``(n, 176)`` inputs."""
        return self._vectors(self.query, inputs)

    def candidate_vectors(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """float32 ``(n, 64)`` unit candidate vectors of ``(n, 176)`` inputs."""
        return self._vectors(self.candidate, inputs)

    def probability(self, scores: np.ndarray) -> np.ndarray:
        """P(connect) of dot-product scores: ``sigmoid(a · score + b)`` (Platt, fitted on validation)."""
        a, b = self.calibration
        return 1.0 / (1.0 + np.exp(-(a * np.asarray(scores, dtype=np.float64) + b)))


# ---- losses (pure functions of vectors) -------------------------------------------------------------------------
def in_batch_softmax_loss(query: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor | float,
                          invalid: torch.Tensor | None = None, hard_negatives: int = 0,
                          hard_weight: float = 1.0, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """B2: mean over rows i of ``-log softmax_j(scale · q_i·c_j - log_q_j)[i]``; row i's positive is candidate i,
    columns beyond the batch are extra negatives. ``invalid`` [B, C] masks non-negatives (never the diagonal);
    ``hard_negatives`` > 0 adds log(hard_weight) to each row's top-k valid negative logits; ``log_q`` [C] is the
    log expected count of each column's user in the sample (the sampled-softmax "logQ" correction: in-batch
    negatives are drawn as often as users appear in positives, so without it the model learns to push
    popular users down)."""
    logits = scale * (query @ candidates.T)
    if log_q is not None:
        logits = logits - log_q[None, :]
    if invalid is not None:
        logits = logits.masked_fill(invalid, _MASKED)
    rows = torch.arange(query.shape[0])
    if hard_negatives > 0 and hard_weight != 1.0 and candidates.shape[0] > 1:
        ranking = logits.detach().clone()
        ranking[rows, rows] = _MASKED
        top = ranking.topk(min(hard_negatives, ranking.shape[1] - 1), dim=1).indices
        boost = torch.zeros_like(logits).scatter_(1, top, math.log(hard_weight))
        if invalid is not None:
            boost = boost.masked_fill(invalid, 0.0)
        boost[rows, rows] = 0.0
        logits = logits + boost
    return F.cross_entropy(logits, rows)


def binary_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor, scale: torch.Tensor | float,
                bias: torch.Tensor | float, negative_valid: torch.Tensor | None = None) -> torch.Tensor:
    """B1: balanced binary cross-entropy, ``(mean BCE of the positives + mean BCE of the valid negatives) / 2``
    on logits ``scale · score + bias``."""
    positive = F.binary_cross_entropy_with_logits(scale * positive_scores + bias, torch.ones_like(positive_scores))
    per_negative = F.binary_cross_entropy_with_logits(scale * negative_scores + bias,
                                                      torch.zeros_like(negative_scores), reduction="none")
    if negative_valid is None:
        return 0.5 * (positive + per_negative.mean())
    weights = negative_valid.to(per_negative.dtype)
    return 0.5 * (positive + (per_negative * weights).sum() / weights.sum().clamp(min=1.0))


def triplet_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor, margin: float,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """B3: mean over valid triplets of ``max(0, margin - s⁺ + s⁻)`` (scores are dot products of unit vectors)."""
    hinge = F.relu(margin - positive_scores + negative_scores)
    if valid is None:
        return hinge.mean()
    weights = valid.to(hinge.dtype)
    return (hinge * weights).sum() / weights.sum().clamp(min=1.0)


def hardest_negatives(scores: torch.Tensor, invalid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each row's highest-scoring valid negative (the diagonal, the positive, never counts) and
    whether the row has one: hard-negative mining from the model's own scores."""
    ranking = scores.detach().masked_fill(invalid, -math.inf)
    rows = torch.arange(scores.shape[0])
    ranking[rows, rows] = -math.inf
    best = ranking.argmax(dim=1)
    return best, torch.isfinite(ranking[rows, best])


def fit_platt(scores: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iterations: int = 50) -> tuple[float, float]:
    """(a, b) maximising the likelihood of ``sigmoid(a · score + b)`` (Newton steps, a small L2 on a)."""
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    theta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) + np.array([l2 * theta[0], 0.0])
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag([l2, 1e-9])
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return float(theta[0]), float(theta[1])


# ---- configuration and result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TwoTowerConfig:
    loss: Loss = "B2"
    epochs: int = 15
    batch_size: int = 2048
    # Small graphs give a handful of 2048-pair batches per pass: an epoch repeats passes up to this many steps.
    min_steps_per_epoch: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 3  # epochs without a better validation AUC (within a curriculum phase) before stopping
    min_delta: float = 1e-4
    hidden_dims: tuple[int, int] = (256, 128)
    output_dim: int = 64
    initial_scale: float = 10.0
    learn_scale: bool = True
    max_scale: float = 100.0
    margin: float = 0.2  # B3
    split: SplitKind = "time"  # how validation and training snapshots are cut (random: for untimed graphs)
    val_fraction: float = 0.1
    checkpoints: tuple[float, ...] = field(default=(0.5, 0.6, 0.7, 0.8, 0.9))  # time: shares of training edges
    folds: int = 5  # random: held-out folds of the training edges
    extra_negatives: int = 512  # B2: sampled negatives per batch (B1/B3 sample one per row)
    logq_correction: bool = True  # B2: subtract log(expected sample count) from each logit (see the loss)
    degree_power: float = 0.75
    hard_negatives: int = 8  # B2, phase 3: negatives of each row weighted up
    hard_negative_weight: float = 3.0
    max_val_edges: int = 20_000
    early_stopping_metric: Literal["auc", "auc_seen"] = "auc"  # auc_seen: pairs of two training-graph users
    seed: int = 0
    progress: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(d) for d in self.hidden_dims))
        object.__setattr__(self, "checkpoints", tuple(float(c) for c in self.checkpoints))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.early_stopping_metric not in ("auc", "auc_seen"):
            raise ValueError("early_stopping_metric is 'auc' or 'auc_seen'")
        if self.split not in ("time", "random"):
            raise ValueError("split must be 'time' or 'random'")
        if not self.checkpoints or not all(0.0 < c < 1.0 for c in self.checkpoints):
            raise ValueError("checkpoints are shares in (0, 1)")
        if self.folds < 2 or self.batch_size < 2 or self.epochs < 1:
            raise ValueError("need folds >= 2, batch_size >= 2, epochs >= 1")

    def tower_config(self) -> TowerConfig:
        return TowerConfig(INPUT_DIM, self.hidden_dims, self.output_dim, self.initial_scale, self.learn_scale,
                           self.max_scale)

    def phase(self, epoch: int) -> int:
        return curriculum_phase(epoch, self.epochs)


@dataclass
class TwoTowerResult:
    model: TwoTowerModel
    metadata: dict[str, Any]
    model_dir: Path
    curve_png: Path
    history: list[dict[str, float]]


# ---- leakage guards ---------------------------------------------------------------------------------------------
def check_sage_before(sage_metadata: Mapping[str, Any], validation_start_ts: int) -> None:
    """Raise :class:`LeakageError` unless the GraphSAGE model was fitted on connections strictly before the
    validation period (``train_end_ts`` in its metadata; a model without it cannot be checked: refused too)."""
    end = sage_metadata.get("train_end_ts")
    if end is None:
        raise LeakageError("the GraphSAGE model's metadata has no train_end_ts: cannot check it saw no "
                           "validation connection (pass split='random' or a model trained by train_embeddings)")
    if int(end) >= int(validation_start_ts):
        raise LeakageError(f"GraphSAGE {sage_metadata.get('version')} was trained on connections up to ts {end}, "
                           f"not before the two-tower validation period (from ts {validation_start_ts})")


# ---- snapshots --------------------------------------------------------------------------------------------------
class SnapshotSource:
    """Tower inputs of a snapshot: the graph's degrees and profiles, the embeddings computed on that graph."""

    def __init__(self, graph: AdjacencyGraph, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.graph = graph
        self.row = {int(user): i for i, user in enumerate(ids.tolist())}
        self.vectors = vectors

    def embedding(self, user: int) -> np.ndarray | None:
        row = self.row.get(user)
        return None if row is None else self.vectors[row]

    def embeddings(self, users: Sequence[int]) -> np.ndarray:
        return self.vectors[[self.row[int(user)] for user in users]]

    def profile(self, user: int) -> Profile | None:
        return self.graph.profile(user)

    def degree(self, user: int) -> int:
        return self.graph.degree(user)


@dataclass
class _Snapshot:
    """Inputs of every user (positions in the global id order) on one message-passing graph, and the pairs of
    that snapshot to learn (positions; never edges of the graph)."""

    inputs: torch.Tensor  # float32 [N, 176]
    active: np.ndarray  # positions with degree > 0: the negatives are drawn from them
    degree_probabilities: np.ndarray  # over ``active``, ∝ degree^power
    a: np.ndarray
    b: np.ndarray
    graph_edges: int
    endpoint_probabilities: np.ndarray = field(default_factory=lambda: np.empty(0))  # [N]: P(user = a candidate)
    uniform_probabilities: np.ndarray = field(default_factory=lambda: np.empty(0))  # [N]: phase-0 extra negatives
    degree_full: np.ndarray = field(default_factory=lambda: np.empty(0))  # [N]: degree-weighted extra negatives


def _cut_before(ordered: Sequence[tuple[int, int, int]], index: int) -> int:
    """Move a cut back so that no edge after it shares the ts of an edge before it (strict time order)."""
    index = max(0, min(index, len(ordered)))
    while 0 < index < len(ordered) and ordered[index - 1][2] == ordered[index][2]:
        index -= 1
    return index


def _split(connections: Sequence[tuple[int, int, int]], config: TwoTowerConfig, rng: np.random.Generator
           ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    if config.split == "time":
        return split_by_time(connections, config.val_fraction)
    seen: set[tuple[int, int]] = set()
    unique: list[tuple[int, int, int]] = []
    for u, v, ts in connections:
        pair = (u, v) if u < v else (v, u)
        if u != v and pair not in seen:
            seen.add(pair)
            unique.append((int(u), int(v), int(ts)))
    held = max(1, math.ceil(config.val_fraction * len(unique)))
    order = rng.permutation(len(unique))
    val = sorted(order[:held].tolist())
    train = sorted(order[held:].tolist())
    return [unique[i] for i in train], [unique[i] for i in val]


def _snapshot_pairs(train_edges: Sequence[tuple[int, int, int]], config: TwoTowerConfig, rng: np.random.Generator
                    ) -> list[tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]]:
    """(message-passing edges, positive edges) per snapshot (see the module doc)."""
    out = []
    if config.split == "time":
        cuts = sorted({_cut_before(train_edges, int(c * len(train_edges))) for c in config.checkpoints})
        cuts = [c for c in cuts if 0 < c < len(train_edges)]
        for i, cut in enumerate(cuts):
            end = cuts[i + 1] if i + 1 < len(cuts) else len(train_edges)
            out.append((list(train_edges[:cut]), list(train_edges[cut:end])))
    else:
        fold = rng.permutation(len(train_edges)) % config.folds
        for k in range(config.folds):
            out.append(([e for e, f in zip(train_edges, fold, strict=True) if f != k],
                        [e for e, f in zip(train_edges, fold, strict=True) if f == k]))
    if not out:
        raise ValueError("too few training connections for a snapshot")
    return out


def _embed_snapshot(sage: GraphSage, salt: int, ids: np.ndarray, edges: Sequence[tuple[int, int, int]],
                    profiles: Mapping[int, Profile] | None) -> tuple[AdjacencyGraph, torch.Tensor]:
    graph = AdjacencyGraph(((u, v) for u, v, _ in edges), profiles)
    vectors = Embedder(sage, graph, graph).embed(ids, salt)
    inputs = tower_inputs(ids, SnapshotSource(graph, ids, vectors))
    return graph, torch.from_numpy(inputs)


# ---- training ---------------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool, loss: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"train two-tower {loss}", unit="step", file=sys.stderr, leave=False)


def _plot_curve(history: list[dict[str, float]], path: Path, loss_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_axis.set(title=f"training loss ({loss_name})", xlabel="epoch", ylabel="loss")
    auc_axis.plot(epochs, [h["val_auc"] for h in history], marker="o", label="all validation pairs")
    auc_axis.plot(epochs, [h["val_auc_seen"] for h in history], marker=".", label="both users in the training graph")
    auc_axis.legend()
    auc_axis.set(title="validation AUC (held-out edges vs non-edges)", xlabel="epoch", ylabel="AUC")
    for previous, current in zip(history, history[1:], strict=False):
        if current["phase"] != previous["phase"]:
            for axis in (loss_axis, auc_axis):
                axis.axvline(current["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train_two_tower(connections: Sequence[tuple[int, int, int]], profiles: Mapping[int, Profile] | None,
                    sage_model_dir: Path | str, out_dir: Path | str,
                    config: TwoTowerConfig | None = None) -> TwoTowerResult:
    """Train the towers on ``connections`` ((u, v, ts), any order) and optional ``profiles``, with the frozen
    GraphSAGE model saved in ``sage_model_dir``; save to ``out_dir/<version>/`` (model, metadata.json with the
    loss, hyper-parameters, validation AUC and the GraphSAGE version, and the training curve)."""
    from pymk.reproducible import deterministic

    config = config or TwoTowerConfig()
    started = time.perf_counter()
    with deterministic(config.seed, config.threads):  # same inputs and seed, same towers
        return _train(connections, profiles, Path(sage_model_dir), Path(out_dir), config, started)


class _PairIndex:
    """Positions of user ids and membership of unordered position pairs in a sorted code array."""

    def __init__(self, ids: np.ndarray, edges: Sequence[tuple[int, int, int]]) -> None:
        self.ids = ids
        self.size = int(ids.shape[0])
        pairs = np.array([(u, v) for u, v, _ in edges], dtype=np.int64).reshape(-1, 2)
        self.codes = np.sort(self.code(self.positions(pairs[:, 0]), self.positions(pairs[:, 1])))

    def positions(self, users: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(users, dtype=np.int64))

    def code(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.minimum(u, v) * self.size + np.maximum(u, v)

    def contains(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.codes.shape[0] == 0:
            return np.zeros(np.broadcast(u, v).shape, dtype=bool)
        codes = self.code(u, v)
        found = np.minimum(np.searchsorted(self.codes, codes), self.codes.shape[0] - 1)
        return self.codes[found] == codes


def _invalid_mask(known: _PairIndex, anchors: np.ndarray, columns: np.ndarray) -> torch.Tensor:
    """Bool [B, C]: column j is no negative of row i (the anchor itself or a known training edge of it); the
    diagonal (row i's positive) is left False."""
    anchor = anchors[:, None]
    invalid = columns[None, :] == anchor
    invalid |= known.contains(np.broadcast_to(anchor, invalid.shape), np.broadcast_to(columns, invalid.shape))
    diagonal = np.arange(anchors.shape[0])
    invalid[diagonal, diagonal] = False
    return torch.from_numpy(invalid)


def _batches(snapshots: Sequence[_Snapshot], batch_size: int, rng: np.random.Generator, min_steps: int = 1
             ) -> list[tuple[int, np.ndarray]]:
    """One epoch: (snapshot, pair indices) batches of near-equal size (no 1-row batch for BatchNorm), shuffled;
    whole passes over the positives are repeated until there are ``min_steps`` batches."""
    out: list[tuple[int, np.ndarray]] = []
    while True:
        one_pass: list[tuple[int, np.ndarray]] = []
        for s, snapshot in enumerate(snapshots):
            count = snapshot.a.shape[0]
            if count < 2:
                continue
            pieces = max(1, math.ceil(count / batch_size))
            one_pass.extend((s, chunk) for chunk in np.array_split(rng.permutation(count), pieces))
        out.extend(one_pass[i] for i in rng.permutation(len(one_pass)))
        if not one_pass or len(out) >= min_steps:
            return out


def _train(connections: Sequence[tuple[int, int, int]], profiles: Mapping[int, Profile] | None, sage_dir: Path,
           out_dir: Path, config: TwoTowerConfig, started: float) -> TwoTowerResult:
    rng = np.random.default_rng(config.seed)
    sage, sage_meta = load_model(sage_dir)
    if sage.config.embedding_dim != EMBEDDING_DIM:
        raise ValueError(f"the towers take {EMBEDDING_DIM}-d GraphSAGE embeddings, got {sage.config.embedding_dim}")
    salt = salt_for_version(str(sage.version))
    train_edges, val_edges = _split(connections, config, rng)
    if config.split == "time":
        check_sage_before(sage_meta, val_edges[0][2])

    ids = np.unique(np.array([(u, v) for u, v, _ in list(train_edges) + list(val_edges)], dtype=np.int64))
    known = _PairIndex(ids, train_edges)

    snapshots: list[_Snapshot] = []
    for graph_edges, positives in _snapshot_pairs(train_edges, config, rng):
        graph, inputs = _embed_snapshot(sage, salt, ids, graph_edges, profiles)
        assert_no_leakage(graph, positives, graph_edges if config.split == "time" else None)
        pairs = np.array([(u, v) for u, v, _ in positives], dtype=np.int64).reshape(-1, 2)
        degree = np.fromiter((graph.degree(int(user)) for user in ids), np.int64, ids.shape[0])
        active = np.flatnonzero(degree > 0)
        if active.shape[0] == 0:
            active = np.arange(ids.shape[0])
        weights = np.maximum(degree[active], 1).astype(np.float64) ** config.degree_power
        a, b = known.positions(pairs[:, 0]), known.positions(pairs[:, 1])
        endpoint = np.bincount(np.concatenate([a, b]), minlength=ids.shape[0]) / (2.0 * max(1, a.shape[0]))
        uniform = np.zeros(ids.shape[0])
        uniform[active] = 1.0 / active.shape[0]
        degree_full = np.zeros(ids.shape[0])
        degree_full[active] = weights / weights.sum()
        snapshots.append(_Snapshot(inputs, active, weights / weights.sum(), a, b, len(graph_edges), endpoint,
                                   uniform, degree_full))

    # Validation: held-out edges on the graph of every training edge, against random non-edges.
    val_graph, val_inputs = _embed_snapshot(sage, salt, ids, train_edges, profiles)
    assert_no_leakage(val_graph, val_edges, train_edges if config.split == "time" else None)
    val_start_ts = min(ts for _, _, ts in val_edges)
    if len(val_edges) > config.max_val_edges:
        chosen = np.sort(rng.choice(len(val_edges), config.max_val_edges, replace=False))
        val_edges = [val_edges[i] for i in chosen]
    val_pairs = [(u, v) if rng.random() < 0.5 else (v, u) for u, v, _ in val_edges]
    every_known = {(min(u, v), max(u, v)) for u, v, _ in list(train_edges) + list(val_edges)}
    negative_pairs = sample_non_edges(val_pairs, ids, every_known, config.seed + 1)

    in_graph = np.fromiter((val_graph.degree(int(user)) > 0 for user in ids), bool, ids.shape[0])

    def seen(pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        array = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        return in_graph[known.positions(array[:, 0])] & in_graph[known.positions(array[:, 1])]

    positive_seen, negative_seen = seen(val_pairs), seen(negative_pairs)

    def validate(model: TwoTowerModel) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """AUC over every validation pair, and over the pairs of two training-graph users (``auc_seen``: what
        the offline evaluation asks, whose query users and targets are all past users)."""
        queries = model.query_vectors(val_inputs)
        candidates = model.candidate_vectors(val_inputs)

        def scores(pairs: Sequence[tuple[int, int]]) -> np.ndarray:
            array = np.array(pairs, dtype=np.int64).reshape(-1, 2)
            rows_u, rows_v = known.positions(array[:, 0]), known.positions(array[:, 1])
            return np.einsum("ij,ij->i", queries[rows_u], candidates[rows_v])

        positive, negative = scores(val_pairs), scores(negative_pairs)
        return ({"auc": roc_auc_of(positive, negative),
                 "auc_seen": roc_auc_of(positive[positive_seen], negative[negative_seen])}, positive, negative)

    model = TwoTowerModel(config.tower_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = len(_batches(snapshots, config.batch_size, np.random.default_rng(0), config.min_steps_per_epoch))
    if steps_per_epoch == 0:
        raise ValueError("no snapshot has two positive pairs to train on")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    bar = _progress(config.epochs * steps_per_epoch, config.progress, config.loss)
    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state, stale = -1.0, 0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(config.epochs):
        phase = config.phase(epoch)
        if epoch > 0 and phase != config.phase(epoch - 1):
            stale = 0
        model.train()
        epoch_started, losses = time.perf_counter(), []
        for s, chunk in _batches(snapshots, config.batch_size, rng, config.min_steps_per_epoch):
            loss = _step_loss(model, snapshots[s], chunk, known, phase, config, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", best_auc=f"{best_auc:.3f}")
        val, _, _ = validate(model)
        auc = val[config.early_stopping_metric]
        record = {"epoch": epoch + 1, "phase": phase, "loss": float(np.mean(losses)), "val_auc": val["auc"],
                  "val_auc_seen": val["auc_seen"],
                  "scale": float(model.scale.detach()), "lr": float(optimizer.param_groups[0]["lr"]),
                  "seconds": time.perf_counter() - epoch_started}
        history.append(record)
        if bar is None and config.progress:
            print(f"epoch {epoch + 1}/{config.epochs} phase {phase} loss {record['loss']:.4f} val AUC "
                  f"{val['auc']:.4f} (seen {val['auc_seen']:.4f})", file=sys.stderr)
        if auc > best_auc + config.min_delta:
            best_auc, best_epoch, best_state, stale = auc, epoch + 1, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience and phase == 2:
                break
    if bar is not None:
        bar.close()

    model.load_state_dict(best_state)
    model.eval()
    best_val, positive, negative = validate(model)
    model.calibration = fit_platt(np.concatenate([positive, negative]),
                                  np.concatenate([np.ones(positive.shape[0]), np.zeros(negative.shape[0])]))
    model.version = make_version(model)
    metadata: dict[str, Any] = {
        "version": model.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "loss": config.loss,
        "hyper_parameters": asdict(config),
        "sage_version": sage.version,
        "sage_dir": str(sage_dir),
        "sage_train_end_ts": sage_meta.get("train_end_ts"),
        "split": config.split,
        "train_edges": len(train_edges),
        "train_users": int(ids.shape[0]),
        "snapshots": [{"graph_edges": s.graph_edges, "positives": int(s.a.shape[0])} for s in snapshots],
        "val_edges": len(val_edges),
        "val_negatives": len(negative_pairs),
        "val_start_ts": val_start_ts,
        "train_end_ts": max(ts for _, _, ts in train_edges),
        "best_val_auc": best_val["auc"],
        "best_val_auc_seen": best_val["auc_seen"],
        "early_stopping_metric": config.early_stopping_metric,
        "val_pairs_seen": int(positive_seen.sum()),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": len(history) < config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "calibration": {"a": model.calibration[0], "b": model.calibration[1],
                        "note": "P(connect) = sigmoid(a * dot + b), Platt on validation pairs (1:1 non-edges)"},
        "wall_seconds": round(time.perf_counter() - started, 3),
        "history": history,
    }
    model_dir = out_dir / model.version
    metadata = save_two_tower(model, model_dir, metadata)
    curve = model_dir / CURVE_FILE
    _plot_curve(history, curve, config.loss)
    return TwoTowerResult(model, metadata, model_dir, curve, history)


def _step_loss(model: TwoTowerModel, snapshot: _Snapshot, chunk: np.ndarray, known: _PairIndex, phase: int,
               config: TwoTowerConfig, rng: np.random.Generator) -> torch.Tensor:
    flip = rng.random(chunk.shape[0]) < 0.5
    a = np.where(flip, snapshot.b[chunk], snapshot.a[chunk])
    b = np.where(flip, snapshot.a[chunk], snapshot.b[chunk])
    count = config.extra_negatives if config.loss == "B2" else a.shape[0]
    if phase == 0:
        negatives = snapshot.active[rng.integers(0, snapshot.active.shape[0], count)]
    else:
        negatives = snapshot.active[rng.choice(snapshot.active.shape[0], size=count, p=snapshot.degree_probabilities)]
    columns = np.concatenate([b, negatives])
    query = model.query(snapshot.inputs[torch.from_numpy(a)])
    candidates = model.candidate(snapshot.inputs[torch.from_numpy(columns)])  # one BatchNorm batch
    invalid = _invalid_mask(known, a, columns)
    if config.loss == "B2":
        hard = config.hard_negatives if phase == 2 else 0
        log_q = None
        if config.logq_correction:
            extra = snapshot.uniform_probabilities if phase == 0 else snapshot.degree_full
            expected = a.shape[0] * snapshot.endpoint_probabilities[columns] + count * extra[columns]
            log_q = torch.from_numpy(np.log(np.maximum(expected, 1e-12)).astype(np.float32))
        return in_batch_softmax_loss(query, candidates, model.scale, invalid, hard, config.hard_negative_weight,
                                     log_q)
    scores = query @ candidates.T
    rows = torch.arange(a.shape[0])
    if phase == 2:
        chosen, valid = hardest_negatives(scores, invalid)
    else:
        chosen = rows + a.shape[0]  # row i's own sampled negative
        valid = ~invalid[rows, chosen]
    positive_scores, negative_scores = scores[rows, rows], scores[rows, chosen]
    if config.loss == "B1":
        return binary_loss(positive_scores, negative_scores, model.scale, model.bias, valid)
    return triplet_loss(positive_scores, negative_scores, config.margin, valid)


# ---- versions, saving, loading (the layout and its checks: pymk/model_artifact.py) ---------------------------------
def make_version(model: TwoTowerModel, when: datetime | None = None) -> str:
    """``tt-<YYYYmmddHHMMSS UTC>-<8 hex of the weights digest>``."""
    return model_artifact.make_version("tt", model, when)


def save_two_tower(model: TwoTowerModel, directory: Path | str,
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.pt`` and ``metadata.json``; returns the metadata written (with the version)."""
    config = asdict(model.config)
    calibration = list(model.calibration)
    return model_artifact.save_torch_model(
        model, directory, metadata, "tt", config,
        {"tower_config": config, "feature_version": FEATURE_VERSION, "calibration_ab": calibration},
        {"calibration": calibration})


def _check_features(directory: Path, meta: dict[str, Any]) -> None:
    if meta.get("feature_version") != FEATURE_VERSION:
        raise ValueError(f"{directory}: towers trained on features {meta.get('feature_version')!r}, this code makes "
                         f"{FEATURE_VERSION!r}")


def load_two_tower(directory: Path | str) -> tuple[TwoTowerModel, dict[str, Any]]:
    """The model saved in ``directory`` (eval mode, version and calibration set) and its metadata."""
    model, meta, payload = model_artifact.load_torch_model(
        directory, lambda config: TwoTowerModel(TowerConfig(**config)), _check_features)
    a, b = payload["calibration"]
    model.calibration = (float(a), float(b))
    return model, meta


# ---- serving (pure part) ------------------------------------------------------------------------------------------
class TwoTowerRanker:
    """Scores a user's candidates with a trained :class:`TwoTowerModel` over a RankingSource-like source
    (``embedding``/``embeddings``, ``profile``, ``degree``). Higher is better; the score is the dot product."""

    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model.eval()

    @property
    def version(self) -> str:
        return str(self.model.version)

    def query_vector(self, user: int, source: TowerFeatureSource) -> np.ndarray:
        return self.model.query_vectors(tower_inputs([user], source))[0]

    def candidate_vectors(self, users: Sequence[int] | np.ndarray, source: TowerFeatureSource) -> np.ndarray:
        """Candidate-tower vectors (what an ANN index over candidates would hold)."""
        return self.model.candidate_vectors(tower_inputs(users, source))

    def score(self, user: int, candidates: Sequence[int] | np.ndarray | Collection[int],
              source: TowerFeatureSource) -> np.ndarray:
        """float64 ``(n,)`` dot(query(user), candidate(c)) for each candidate, in the given order."""
        ids = np.fromiter((int(c) for c in candidates), np.int64)
        if ids.shape[0] == 0:
            return np.empty(0)
        query = self.query_vector(user, source)
        return (self.candidate_vectors(ids, source) @ query).astype(np.float64)

    def probability(self, user: int, candidates: Sequence[int] | np.ndarray, source: TowerFeatureSource
                    ) -> np.ndarray:
        return self.model.probability(self.score(user, candidates, source))


def _rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Mean rank of each score within the list, scaled to [0, 1] (ties share their mean rank)."""
    n = scores.shape[0]
    if n <= 1:
        return np.full(n, 0.5)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts + 1) / 2.0  # 0-based mean rank of each tie group
    return mean_rank[inverse] / (n - 1)


def blend_scores(xgb_scores: np.ndarray, tt_scores: np.ndarray, weight: float,
                 method: Literal["rank", "logit"] = "rank") -> np.ndarray:
    """Blend of one user's candidate scores: ``(1 - weight) · XGBoost + weight · two-tower``.

    ``rank`` (default): each score list is replaced by its rank in the list, scaled to [0, 1], then averaged;
    scale-free (XGBoost probabilities and dot products need no common scale) and robust to either model's
    calibration, but it depends on the list. ``logit``: both inputs are probabilities (XGBoost's
    ``predict`` and :meth:`TwoTowerModel.probability`), the blend is of their logits: a score that means the
    same for every list, at the price of trusting both calibrations."""
    xgb = np.asarray(xgb_scores, dtype=np.float64)
    tt = np.asarray(tt_scores, dtype=np.float64)
    if xgb.shape != tt.shape:
        raise ValueError("one two-tower score per XGBoost score")
    if not 0.0 <= weight <= 1.0:
        raise ValueError("weight in [0, 1]")
    if method == "rank":
        return (1.0 - weight) * _rank_normalise(xgb) + weight * _rank_normalise(tt)
    if method == "logit":
        eps = 1e-7

        def logit(p: np.ndarray) -> np.ndarray:
            p = np.clip(p, eps, 1.0 - eps)
            return np.log(p) - np.log1p(-p)

        return (1.0 - weight) * logit(xgb) + weight * logit(tt)
    raise ValueError("method is 'rank' or 'logit'")
