"""Running real `pymk worker` processes from tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings
from pymk.streams.topics import ensure_topics

T = TypeVar("T")


def http_get(settings: Settings, path: str, timeout: float = 5.0) -> Any:
    url = f"http://{settings.web_host}:{settings.web_port}{path}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if response.headers.get_content_type() == "application/json" else body.decode()


def metric_samples(settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A worker's ``/metrics``, parsed by prometheus_client's parser: (sample name, sorted labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(settings, "/metrics")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def wait_until(predicate: Any, timeout: float, interval: float = 0.3, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling through start-up errors
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s (last error: {last_error!r})")


def owned_partitions(settings: Settings) -> list[int]:
    """The partitions the worker says it owns (``/health``)."""
    return list(http_get(settings, "/health")["partitions"])


def wait_until_shared(workers: list[Settings], partitions: int, what: str, every_worker: bool = True,
                      timeout: float = 120.0) -> None:
    """Until ``workers`` own all ``partitions`` between them (and, with ``every_worker``, each owns some)."""
    def shared() -> bool:
        owned = [owned_partitions(w) for w in workers]
        return (sorted(p for part in owned for p in part) == list(range(partitions))
                and (not every_worker or all(owned)))

    wait_until(shared, timeout, what=what)


@contextmanager
def running_worker(settings: Settings, log_path: Path, ready_timeout: float = 90.0, python: str | None = None,
                   cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A `pymk worker` subprocess with these settings; yields once /health answers; stops it after.
    ``python``: another interpreter's installation of pymk (default: this one's)."""
    proc = (start_worker_process(settings, log_path) if python is None
            else start_worker_process(settings, log_path, python=python, cwd=cwd))
    try:
        wait_until(lambda: proc.poll() is None and http_get(settings, "/health")["status"] == "ok",
                   ready_timeout, what=f"worker ready (log: {log_path})")
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def workers_beside_a_reference(base: Settings, workers: list[Settings], log_dir: Path,
                               reference_run: Callable[[], T]) -> Iterator[tuple[list[subprocess.Popen], Future[T]]]:
    """``reference_run`` (one worker on its own topics) in a thread while ``workers`` start as processes on
    ``base``'s topics; yields (their processes, the reference's future) once they share every partition, and
    stops them on the way out."""
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(reference_run)
        ensure_topics(base)
        processes = [start_worker_process(w, log_dir / f"worker{i}.log") for i, w in enumerate(workers)]
        try:
            wait_until_shared(workers, base.partitions,
                              f"{len(workers)} workers share the {base.partitions} partitions")
            yield processes, reference
        finally:
            for process in processes:
                stop_process(process)
