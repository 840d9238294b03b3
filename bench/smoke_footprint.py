"""Wall time and peak memory of the smoke job (`make demo`), measured as a user sees them.

Runs ``python -m pipeline run jobs/smoke.yaml`` and samples, every 0.2 s, the summed RSS of the
whole process tree (driver, GCS, raylet, Ray workers and actors); shared pages are counted once
per process, so the peak is an upper bound. Prints both against the README's budget
(5 minutes, 8 GiB) as ratios.

    python bench/smoke_footprint.py [overrides...]     e.g. storage.url=/tmp/smoke-footprint
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S, BUDGET_GIB = 300.0, 8.0


PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants, read from /proc (Linux)."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree)


def main() -> int:
    cmd = [sys.executable, "-m", "pipeline", "run", "jobs/smoke.yaml", *sys.argv[1:]]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    gib = peak / 2**30
    print(f"\n[footprint] rc={child.returncode} wall {wall:.1f} s "
          f"({wall / BUDGET_S:.2f}x of 5 min), "
          f"peak process-tree RSS {gib:.2f} GiB ({gib / BUDGET_GIB:.2f}x of 8 GiB), "
          f"{os.cpu_count()} CPUs", flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
