"""Inductive GraphSAGE over sampled mini-graphs: the user-embedding model of the candidate index.

Each layer is ``h_u' = W · concat(h_u, mean_{v ∈ sample(N(u))} h_v) + b`` (the GraphSAGE mean variant),
with ReLU and dropout between layers and an L2-normalised output, so dot products are cosines and the
FAISS index can use inner product. A user without neighbours aggregates a zero vector, so its embedding
comes from its own features alone (cold start).

Neighbour identity sketch (``identity_dim``, optional): at the first layer each *neighbour* also sends a
fixed pseudo-random ±1/sqrt(d) code of its user id (a stable hash, nothing learned per user), so the
aggregate is a random projection of the user's sampled neighbour set. Two users with many common
neighbours then get correlated inputs, which profile-less graphs (CollegeMsg) need for link prediction.
A user's *own* code is never an input: users with equal profile and degree and no neighbours still get
equal embeddings, and the model stays inductive (codes of unseen users are as good as any).

Reproducibility: neighbour sums run in the sampler's canonical order, and in eval mode every matrix
product sees at least :data:`MIN_STABLE_ROWS` rows (MKL's small-M kernels round differently from its
large-M ones), so a user's vector does not depend on which other users share its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pymk import model_artifact
from pymk.index.node_features import FEATURE_CONFIG, FEATURE_VERSION, NODE_FEATURE_DIM
from pymk.index.sampling import SampledSubgraph, mix64

MIN_STABLE_ROWS = 32  # matmuls below 16 rows round differently on MKL (measured); 32 leaves a margin
_SKETCH_SEED = np.uint64(0x5EED_1D5E_7C0D_E001)


@dataclass(frozen=True)
class SageConfig:
    input_dim: int = NODE_FEATURE_DIM
    hidden_dim: int = 256
    embedding_dim: int = 128
    layers: int = 2
    fanout: tuple[int, ...] = field(default=(10, 10))  # neighbours sampled per node first reached at hop h
    dropout: float = 0.3
    identity_dim: int = 32  # neighbour identity sketch (0: off); see the module doc

    def __post_init__(self) -> None:
        object.__setattr__(self, "fanout", tuple(int(f) for f in self.fanout))
        if self.layers < 1 or len(self.fanout) != self.layers:
            raise ValueError("need at least one layer and one fanout per layer")
        if min(self.fanout) < 0 or self.identity_dim < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("fanouts and identity_dim must be non-negative, dropout in [0, 1)")


@dataclass(frozen=True)
class SageBatch:
    """Tensors of one :class:`~pymk.index.sampling.SampledSubgraph` (only its nodes, never the graph)."""

    features: torch.Tensor  # float32 [num_nodes, input_dim]
    identity: torch.Tensor | None  # float32 [num_nodes, identity_dim], None when the sketch is off
    neighbour_index: torch.Tensor  # int64 [nodes of hops < L, max fanout], local indices, -1 = padding
    neighbour_count: torch.Tensor  # float32 [nodes of hops < L]
    hop_offsets: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])


def identity_sketch(node_ids: np.ndarray, dim: int) -> np.ndarray:
    """float32 ``[n, dim]`` fixed ±1/sqrt(dim) codes of user ids (a stable hash: same in every process)."""
    ids = np.asarray(node_ids, dtype=np.int64).view(np.uint64)[:, None]
    bits = mix64(mix64(ids ^ _SKETCH_SEED) + np.arange(dim, dtype=np.uint64)[None, :])
    scale = np.float32(1.0 / np.sqrt(dim)) if dim else np.float32(0.0)
    return np.where((bits >> np.uint64(63)) == 1, scale, -scale).astype(np.float32)


def make_batch(subgraph: SampledSubgraph, features: np.ndarray, identity_dim: int) -> SageBatch:
    """Model input of a sampled mini-graph; ``features[i]`` are the input features of
    ``subgraph.node_ids[i]``."""
    if features.shape[0] != subgraph.num_nodes:
        raise ValueError("one feature row per mini-graph node")
    identity = (torch.from_numpy(identity_sketch(subgraph.node_ids, identity_dim)) if identity_dim > 0 else None)
    return SageBatch(
        features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
        identity=identity,
        neighbour_index=torch.from_numpy(subgraph.neighbour_index),
        neighbour_count=torch.from_numpy(subgraph.neighbour_count.astype(np.float32)),
        hop_offsets=subgraph.hop_offsets,
    )


def _mean_neighbours(messages: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean of each row's neighbour messages (zeros without neighbours), summed column by column of the
    sample so the float order is the sampler's canonical order whatever the batch."""
    rows, width = index.shape
    if width == 0:
        return messages.new_zeros(rows, messages.shape[1])
    padded = torch.cat([messages, messages.new_zeros(1, messages.shape[1])])
    index = torch.where(index < 0, messages.shape[0], index)
    total = padded[index[:, 0]]
    for column in range(1, width):
        total = total + padded[index[:, column]]
    return total / count.clamp(min=1.0).unsqueeze(1)


class GraphSage(nn.Module):
    def __init__(self, config: SageConfig) -> None:
        super().__init__()
        self.config = config
        self.version: str | None = None  # set when trained, saved or loaded
        sizes = [config.hidden_dim] * (config.layers - 1) + [config.embedding_dim]
        inputs = [2 * config.input_dim + config.identity_dim] + [2 * config.hidden_dim] * (config.layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(inputs, sizes, strict=True))
        self.dropout = nn.Dropout(config.dropout)

    def _linear(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.shape[0] >= MIN_STABLE_ROWS:
            return linear(x)
        padded = torch.cat([x, x.new_zeros(MIN_STABLE_ROWS - x.shape[0], x.shape[1])])
        return linear(padded)[: x.shape[0]]

    def forward(self, batch: SageBatch) -> torch.Tensor:
        """L2-normalised embeddings ``[num_roots, embedding_dim]`` of the batch's roots."""
        layers = self.config.layers
        h = batch.features
        for depth, linear in enumerate(self.layers):
            num_dst = batch.hop_offsets[layers - depth]  # nodes of hops < layers - depth
            messages = h
            if depth == 0 and batch.identity is not None:
                messages = torch.cat([h, batch.identity], dim=1)
            neighbour_mean = _mean_neighbours(messages, batch.neighbour_index[:num_dst],
                                              batch.neighbour_count[:num_dst])
            h = self._linear(linear, torch.cat([h[:num_dst], neighbour_mean], dim=1))
            if depth < layers - 1:
                h = self.dropout(F.relu(h))
        return F.normalize(h, dim=1)


# ---- versions, saving, loading (the layout and its checks: pymk/model_artifact.py) -------------------------------
def make_version(model: GraphSage, when: datetime | None = None) -> str:
    """``sage-<YYYYmmddHHMMSS UTC>-<8 hex of the weights digest>``."""
    return model_artifact.make_version("sage", model, when)


def save_model(model: GraphSage, directory: Path | str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.pt`` and ``metadata.json`` to ``directory``; returns the metadata written (with
    ``version``, from ``metadata``, else the model's, else a new one)."""
    config = asdict(model.config)
    return model_artifact.save_torch_model(model, directory, metadata, "sage", config,
                                           {"sage_config": config, "feature_config": FEATURE_CONFIG})


def _check_features(directory: Path, meta: dict[str, Any]) -> None:
    saved_features = meta.get("feature_config", {}).get("version")
    if saved_features != FEATURE_VERSION:
        raise ValueError(f"{directory}: model trained on features {saved_features!r}, this code makes "
                         f"{FEATURE_VERSION!r}")


def load_model(directory: Path | str) -> tuple[GraphSage, dict[str, Any]]:
    """The model saved in ``directory`` (in eval mode, ``version`` set) and its metadata."""
    model, meta, _ = model_artifact.load_torch_model(directory, lambda config: GraphSage(SageConfig(**config)),
                                                     _check_features)
    return model, meta
