"""Running real `pymk worker` processes from tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings


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
