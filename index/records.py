"""A user's embedding as stored (RocksDB, owner partition) and as shipped (the compacted ``embeddings`` topic).

One binary layout for both, so the owner writes the same bytes it produces. ``version`` counts the user's
embeddings (1 for the first); a reader keeps the record with the highest version, and for an equal version the
one read last (a worker that re-processes events after a crash re-embeds under the same version and its record
comes later on the topic, so the topic's last word equals the owner's RocksDB row).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_HEADER = struct.Struct("<4sqqqH")  # magic, user, version, ts (event ms), len(model version)
_MAGIC = b"PME1"


@dataclass(frozen=True)
class EmbeddingRecord:
    user: int
    version: int
    ts: int  # wall-clock ms at which it was computed
    model_version: str
    vector: np.ndarray  # (dim,) float32, L2-normalised; empty for a deletion

    def encode(self) -> bytes:
        name = self.model_version.encode()
        vector = np.ascontiguousarray(self.vector, dtype="<f4")
        return _HEADER.pack(_MAGIC, self.user, self.version, self.ts, len(name)) + name + vector.tobytes()

    @classmethod
    def decode(cls, raw: bytes) -> EmbeddingRecord:
        magic, user, version, ts, name_length = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise ValueError(f"not an embedding record (magic {magic!r})")
        start = _HEADER.size + name_length
        vector = np.frombuffer(raw, dtype="<f4", offset=start).astype(np.float32)
        return cls(user, version, ts, raw[_HEADER.size:start].decode(), vector)

    @property
    def key(self) -> bytes:
        return str(self.user).encode()
