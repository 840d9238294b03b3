"""Wall time and peak memory of the smoke job (`make demo`), measured as a user sees them.

Runs ``python -m pipeline run jobs/smoke.yaml`` and samples, every 0.2 s, the summed RSS of the
whole process tree (driver, GCS, raylet, Ray workers and actors); shared pages are counted once
per process, so the peak is an upper bound. Prints both against the README's budget
(5 minutes, 8 GiB) as ratios.

    python bench/smoke_footprint.py [overrides...]     e.g. storage.url=/tmp/smoke-footprint
"""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

BUDGET_S, BUDGET_GIB = 300.0, 8.0


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> int:
    cmd = [sys.executable, "-m", "pipeline", "run", "jobs/smoke.yaml", *sys.argv[1:]]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    gib = peak / 2**30
    print(f"\n[footprint] rc={child.returncode} wall {wall:.1f} s ({wall / BUDGET_S:.2f}x of 5 min), "
          f"peak process-tree RSS {gib:.2f} GiB ({gib / BUDGET_GIB:.2f}x of 8 GiB), "
          f"{psutil.cpu_count()} CPUs", flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
