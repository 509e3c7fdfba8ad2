"""One on-disk layout for every torch model (pymk/model_artifact.py): written atomically, metadata last,
refused at load when the weights do not match their digest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pymk import model_artifact


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.layer = nn.Linear(width, 1)
        self.version: str | None = None


def _save(tmp_path: Path, model: Tiny) -> dict:
    return model_artifact.save_torch_model(model, tmp_path, {"note": "x"}, "tiny", {"width": model.width},
                                           {"tiny_config": {"width": model.width}}, {"extra": 7})


def test_round_trip_keeps_weights_version_and_payload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny(3)
    meta = _save(tmp_path, model)
    assert meta["version"].startswith("tiny-") and meta["version"] == model.version
    assert meta["weights_digest"] == model_artifact.weights_digest(model)
    assert json.loads((tmp_path / "metadata.json").read_text()) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", "model.pt"]  # no temporaries left
    loaded, loaded_meta, payload = model_artifact.load_torch_model(tmp_path, lambda config: Tiny(config["width"]))
    assert loaded.version == model.version and loaded_meta == meta and payload["extra"] == 7
    assert not loaded.training
    assert torch.equal(loaded.layer.weight, model.layer.weight)


def test_a_given_version_is_kept(tmp_path: Path) -> None:
    model = Tiny(2)
    meta = model_artifact.save_torch_model(model, tmp_path, {"version": "tiny-mine"}, "tiny", {"width": 2}, {})
    assert meta["version"] == model.version == "tiny-mine"


def test_weights_that_do_not_match_the_digest_are_refused(tmp_path: Path) -> None:
    _save(tmp_path, Tiny(3))
    meta = json.loads((tmp_path / "metadata.json").read_text())
    meta["weights_digest"] = "0" * 32
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights do not match"):
        model_artifact.load_torch_model(tmp_path, lambda config: Tiny(config["width"]))


def test_a_metadata_check_refuses_before_reading_weights(tmp_path: Path) -> None:
    _save(tmp_path, Tiny(3))
    (tmp_path / "model.pt").write_bytes(b"not a torch file")

    def refuse(directory: Path, meta: dict) -> None:
        raise ValueError(f"{directory}: other features")

    with pytest.raises(ValueError, match="other features"):
        model_artifact.load_torch_model(tmp_path, lambda config: Tiny(config["width"]), refuse)
