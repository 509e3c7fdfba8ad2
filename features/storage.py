"""The small storage interface the feature code runs on, and its RocksDB implementation (rocksdict).

Feature state is a set of *rows*: one value per (row kind, user id). Pure code reads rows through
:class:`RowStore` and writes them back in one atomic batch per commit, so a crash leaves the database at
the previous commit, never half-way through one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

_ID = struct.Struct(">Q")  # big-endian: keys of one kind sort by user id


def row_key(kind: bytes, user: int) -> bytes:
    return kind + _ID.pack(user)


def row_user(key: bytes) -> int:
    return int(_ID.unpack_from(key, 1)[0])


class RowStore(Protocol):
    """What the feature code needs from a key-value store."""

    def get(self, key: bytes) -> bytes | None: ...

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        """Apply all puts and deletes atomically."""
        ...

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...

    def close(self) -> None: ...


class RocksRowStore:
    """A RocksDB database (through rocksdict, raw bytes mode) as a :class:`RowStore`."""

    def __init__(self, path: str | Path, sync: bool = False) -> None:
        from rocksdict import Options, Rdict, WriteOptions

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_background_jobs(2)
        options.increase_parallelism(2)
        self._db = Rdict(str(self.path), options)
        write_options = WriteOptions()
        # The WAL is on; fsync per batch is a setting (a machine crash, not a process crash, needs it).
        write_options.sync = sync
        self._db.set_write_options(write_options)

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in puts.items():
            batch.put(key, value)
        for key in deletes:
            batch.delete(key)
        if not batch.is_empty():
            self._db.write(batch)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def close(self) -> None:
        self._db.close()


class DictRowStore:
    """A plain dict with the same interface, for pure-function tests that need thousands of fresh stores."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        self.data.update(puts)
        for key in deletes:
            self.data.pop(key, None)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key in sorted(k for k in self.data if k.startswith(prefix)):
            yield key, self.data[key]

    def close(self) -> None:
        pass
