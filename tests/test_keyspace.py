"""The one-byte key prefixes of a partition's database are one table (features/keyspace.py), without clashes."""

from __future__ import annotations

import re

from conftest import REPO
from pymk.features import keyspace
from pymk.features.storage import DictRowStore, row_key


def test_every_prefix_is_one_byte_and_unique() -> None:
    prefixes = [kind.prefix for kind in keyspace.ROW_KINDS]
    assert all(len(p) == 1 for p in prefixes)
    assert len(set(prefixes)) == len(prefixes), sorted(prefixes)
    assert len({kind.name for kind in keyspace.ROW_KINDS}) == len(prefixes)
    constants = {v for k, v in vars(keyspace).items() if k.isupper() and isinstance(v, bytes)}
    assert constants == set(prefixes)  # no constant outside the table, no table entry without its constant


def test_no_module_defines_a_prefix_of_its_own() -> None:
    # a bytes constant of one capital letter, defined outside the table, would be a row kind nobody checks
    stray = re.compile(r'^[A-Z_]+ = b"[A-Za-z]"', re.MULTILINE)
    found = [f"{path.relative_to(REPO)}: {match}" for folder in ("features", "streams", "index", "ranking", "pymk")
             for path in (REPO / folder).rglob("*.py") if path.name != "keyspace.py"
             for match in stray.findall(path.read_text())]
    assert not found, found


def test_a_scan_of_one_kind_reads_only_its_rows() -> None:
    store = DictRowStore()
    for kind in keyspace.ROW_KINDS:
        store.write({row_key(kind.prefix, 7): kind.name.encode()})
    store.write({keyspace.OFFSETS + b"pymk.connections": b"12"})
    for kind in keyspace.ROW_KINDS:
        names = {value for _, value in store.scan(kind.prefix)}
        expected = {kind.name.encode()} | ({b"12"} if kind.prefix == keyspace.OFFSETS else set())
        assert names == expected, kind.name
