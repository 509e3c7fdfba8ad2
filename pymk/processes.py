"""Starting and stopping `pymk worker` processes (the demo, benchmarks and tests run real workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pymk.settings import Settings


def start_worker_process(settings: Settings, log_path: Path, python: str = sys.executable,
                         cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A `pymk worker` with these settings in its own process group, logging to ``log_path``; ``python``: the
    interpreter whose installation of pymk runs it (a test's non-editable install)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([python, "-m", "pymk.cli", "worker"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **settings.as_env()},
                                start_new_session=True, cwd=cwd)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL of the whole process group if it has not exited within ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
