"""Bit-exact training runs: one seed for every random number generator a training step can touch, deterministic
torch kernels and a fixed torch thread count, all restored afterwards (the evaluation, the demo and the tests go
on in the same interpreter, and must not inherit a training's global state).

Why each setting: python ``random`` and numpy's global generator are seeded although our code draws from its own
seeded generators, so a library that uses the globals cannot make two runs differ; ``torch.manual_seed`` drives
dropout and parameter initialisation; ``use_deterministic_algorithms`` makes torch pick (or refuse to run without)
kernels whose float summation order does not depend on scheduling (e.g. the accumulating ``index_put_`` behind the
backward of embedding-row gathers): without it, two GraphSAGE trainings on the same CollegeMsg edges and seed ended
with different weights; the thread count fixes how BLAS splits its reductions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np


@contextmanager
def deterministic(seed: int, threads: int | None = None) -> Iterator[None]:
    """Run the body seeded and on deterministic torch kernels (``threads``: torch threads, None: unchanged)."""
    import torch

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True)
            if threads is not None:
                torch.set_num_threads(threads)
            yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def config_digest(*configs: Any, exclude: tuple[str, ...] = ("progress",)) -> str:
    """sha256 of configuration dataclasses (fields in ``exclude`` left out: they change no result)."""
    parts = []
    for config in configs:
        fields = asdict(config) if is_dataclass(config) and not isinstance(config, type) else config
        if isinstance(fields, dict):
            fields = {key: value for key, value in fields.items() if key not in exclude}
        parts.append({"type": type(config).__name__, "fields": fields})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()
