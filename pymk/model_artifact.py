"""A saved model on disk, one layout for every model pymk trains: a folder with the model's file and a
``metadata.json`` that carries its ``version`` (what every embedding and every published list is stamped with)
and, for the torch models, the digest of the weights, checked at load.

* GraphSAGE (``index/sage.py``), the two-tower model (``ranking/two_tower.py``) and the cross-attention re-ranker
  (``ranking/cross_attention.py``) save ``model.pt`` (``{"config", "state_dict", "version", …}``) through
  :func:`save_torch_model` and load it through :func:`load_torch_model`;
* the XGBoost ranker (``ranking/model.py``) writes ``model.ubj`` through :func:`write_artifact`.

Writes are atomic file by file (a temporary name, then a rename) and the metadata lands last, so a reader that
finds a version in ``metadata.json`` finds the model file it describes. Which version a worker serves
(``current``, rollback, promotion) is ``ranking/model_store.py``'s.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from hashlib import blake2b
from pathlib import Path
from typing import Any, Protocol, TypeVar

METADATA_FILE = "metadata.json"
TORCH_MODEL_FILE = "model.pt"


class VersionedModule(Protocol):
    """A torch module with the version it was saved or loaded under (None before its first save)."""

    version: str | None

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any: ...

    def eval(self) -> Any: ...


M = TypeVar("M", bound=VersionedModule)


def weights_digest(model: VersionedModule) -> str:
    """Hex blake2b of a torch model's state (names and bytes, in name order; buffers such as BatchNorm statistics
    included): the digest in every torch model's version."""
    digest = blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_version(prefix: str, model: VersionedModule, when: datetime | None = None) -> str:
    """``<prefix>-<YYYYmmddHHMMSS UTC>-<8 hex of the weights digest>``."""
    when = when or datetime.now(UTC)
    return f"{prefix}-{when:%Y%m%d%H%M%S}-{weights_digest(model)[:8]}"


def write_artifact(directory: Path | str, files: Mapping[str, bytes], metadata: Mapping[str, Any],
                   indent: int = 2, sort_keys: bool = True) -> Path:
    """``files`` then ``metadata.json`` into ``directory`` (created when missing), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metadata, indent=indent, sort_keys=sort_keys, default=str)
    for name, data in (*files.items(), (METADATA_FILE, (text + "\n").encode())):
        temporary = directory / f".{name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, directory / name)
    return directory


def read_metadata(directory: Path | str) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA_FILE).read_text())


def save_torch_model(model: VersionedModule, directory: Path | str, metadata: Mapping[str, Any] | None,
                     version_prefix: str, config: Mapping[str, Any], metadata_fields: Mapping[str, Any],
                     payload_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.pt`` and ``metadata.json``; returns the metadata written. The version comes from
    ``metadata``, else the model's, else a new ``<version_prefix>-…``; ``metadata_fields`` (the model's config
    under its own key, its feature version, …) are added to the metadata, ``payload_fields`` to ``model.pt``."""
    import torch

    meta = dict(metadata or {})
    version = str(meta.get("version") or model.version or make_version(version_prefix, model))
    meta.update(version=version, **metadata_fields, weights_digest=weights_digest(model))
    buffer = io.BytesIO()
    torch.save({"config": dict(config), "state_dict": model.state_dict(), "version": version,
                **(payload_fields or {})}, buffer)
    write_artifact(directory, {TORCH_MODEL_FILE: buffer.getvalue()}, meta)
    model.version = version
    return meta


def load_torch_model(directory: Path | str, build: Callable[[dict[str, Any]], M],
                     check_metadata: Callable[[Path, dict[str, Any]], None] | None = None
                     ) -> tuple[M, dict[str, Any], dict[str, Any]]:
    """(the model saved in ``directory``, in eval mode with its version set; its metadata; the ``model.pt``
    payload). ``build`` makes an untrained model from the saved config; ``check_metadata`` refuses a model
    this code cannot serve (trained on other features) before the weights are read. A model whose weights do not
    match the digest in its metadata is refused."""
    import torch

    directory = Path(directory)
    meta = read_metadata(directory)
    if check_metadata is not None:
        check_metadata(directory, meta)
    payload = torch.load(directory / TORCH_MODEL_FILE, map_location="cpu", weights_only=True)
    model = build(payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    if weights_digest(model) != meta.get("weights_digest"):
        raise ValueError(f"{directory}: weights do not match metadata.json")
    model.version = str(payload["version"])
    return model, meta, payload
