"""bench.timing: call-time sums, window rates, and committed-clip rates read back from a real
local feature store's commit records (the instrumentation the product no longer carries)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from bench.timing import CallTimes, commit_times, rates, window_rate
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage


def test_call_times_add_up_and_print_every_n_calls(capsys):
    times = CallTimes(every=2, concurrency=2)
    t0 = time.perf_counter() - 1.0  # each call below started 1 s ago
    for _ in range(3):
        times.add(32, t0, stage=0.1, gpu=0.6, table=0.05)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[model actor]")]
    assert len(lines) == 1 and lines[0].startswith("[model actor] 2 calls, 64 clips in ")
    assert times.calls == 3 and times.clips == 96
    assert times.sums["stage"] == pytest.approx(0.3) and times.sums["gpu"] == pytest.approx(1.8)
    # three ~1-s calls (each started at t0), read 2 s after the first began, on 2 threads:
    # busy = 3 s / (2 s x 2) = 0.75, 96 clips / 2 s = 48 clips/s
    summary = times.summary(now=t0 + 2.0)
    assert summary.startswith("3 calls, 96 clips in 2.0 s (48.0 clips/s); ")
    assert "ms per call: stage 100, gpu 600, table 50, write 0, call 10" in summary
    assert float(summary.rsplit("busy ", 1)[1]) == pytest.approx(0.75, abs=0.01)


def test_call_times_report_the_stages_they_are_given():
    times = CallTimes(stages=("features", "table"))
    times.add(4, time.perf_counter() - 0.5, features=0.4, table=0.1)
    assert "ms per call: features 400, table 100, call 50" in times.summary()


def test_window_rate_ignores_start_up_and_the_end_burst():
    # 10 s of start-up, then 10 clips/s, then the last 40 clips flushed within 0.1 s
    commits = [(10.0 + i, 10 * (i + 1)) for i in range(16)] + [(25.1, 200)]
    # 20% = 40 clips (t 13), 90% = 180 clips: first reached by the burst commit (200 at t 25.1)
    assert window_rate(commits) == pytest.approx((200 - 40) / (25.1 - 13.0), abs=1e-3)
    assert window_rate(commits, hi=0.8) == pytest.approx(10.0)  # 40 -> 160 clips over 13 -> 25 s
    assert window_rate([(5.0, 64)]) is None and window_rate([]) is None


def test_rates_from_a_real_stores_commit_records(tmp_path):
    """Four shards committed into a local store, their commit records' times set 10, 12, 14 and
    15 s after t0: the series, the first shard, the rate after it and the window come back."""
    store = FeatureStore(Storage(str(tmp_path)), "f")
    t0 = 1_000_000.0
    for i, (rows, at) in enumerate(((8, 10.0), (16, 12.0), (8, 14.0), (8, 15.0))):
        info = store.write_shard({"video_id": [f"v{i}"] * rows, "clip_index": list(range(rows)),
                                  "label_index": [0] * rows, "split": ["train"] * rows,
                                  "student": np.zeros((rows, 2, 4), np.float16)})
        os.utime(tmp_path / "features" / "f" / "commits" / f"{info['shard']}.json", (t0 + at,) * 2)
    series = commit_times(tmp_path / "features" / "f", t0)
    assert series == [(10.0, 8), (12.0, 24), (14.0, 32), (15.0, 40)]
    r = rates(series)
    assert r["first_s"] == 10.0 and r["steady"] == pytest.approx(32 / 5)
    # 20% of 40 clips: the first shard (8 at 10 s); 90%: the last (40 at 15 s); 70%: 32 at 14 s
    assert r["window"] == pytest.approx((40 - 8) / (15.0 - 10.0))
    assert window_rate(series, hi=0.7) == pytest.approx((32 - 8) / (14.0 - 10.0))
    assert rates(series[:3])["steady"] is None  # fewer than 4 outputs: no steady figure
    assert rates([]) == {"first_s": None, "steady": None, "window": None}
