"""What every benchmark script shares: the machine it ran on, peak-memory sampling, and writing the JSON report."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch


def environment() -> dict:
    """Versions and machine facts a benchmark's numbers depend on (load average: was the machine busy?)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_report(report: dict, path: str | Path) -> Path:
    """Write `report` (with the environment added) as JSON and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "environment": {**environment(), **report.get("environment", {})}}, indent=2))
    print(f"\nwrote {path}")
    return path


class PeakRSS:
    """Context manager: peak resident memory (MiB, `.mib`) above the level at entry, sampled every `interval` s by
    a thread (CPU has no allocator statistics like `torch.cuda.max_memory_allocated`)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.process = psutil.Process()

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.mib = (self.peak - self.start) / 2**20
