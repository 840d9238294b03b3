"""bench/footage.py: >= 30 distinct real sources, deterministic distinct clips, a split by source
that the pipeline's sources stage reads. Small sizes (4 sources, 64 px, 12 frames) keep it fast."""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from bench import footage
from pipeline.config import DecodeConfig, SourcesConfig
from pipeline.decode import decode_clips
from pipeline.sources import list_videos

SMALL = {"clips": 3, "frames": 12, "size": 64, "holdout": 0.5, "seed": 0}
PICK = ("camera", "chelsea", "coins", "carphone")   # photos of two groups (one of 2 sources), a video


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sources = [s for s in footage.SOURCES if s.name in PICK]
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return footage.build(a / "f", sources=sources, **SMALL), a / "f", b / "f", sources


def test_the_full_set_has_30_distinct_real_sources_split_by_source():
    names = [s.name for s in footage.SOURCES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    groups = {s.group for s in footage.SOURCES}
    assert groups == {"people_animals", "objects_scenes", "textures_documents", "science", "video"}
    val = footage.held_out(list(footage.SOURCES), 0.25, seed=0)
    assert len(val) >= 0.2 * len(names)
    for g in groups:                                  # every group on both sides
        members = {s.name for s in footage.SOURCES if s.group == g}
        assert members & val and members - val, g
    assert footage.held_out(list(footage.SOURCES), 0.25, seed=1) != val   # the seed moves it


def test_every_source_loads_real_pixels():
    seen = []
    for src in footage.SOURCES:
        got = src.load()
        if src.is_video:
            assert got.exists() and got.stat().st_size > 1000, src.name
            continue
        img = np.asarray(got)
        assert img.dtype == np.uint8 and min(img.shape[:2]) >= 25, src.name
        assert img.std() > 5, f"{src.name}: flat image"
        seen.append(img)
    # no two photos are the same picture
    small = [footage._fit(footage._rgb(i), 16)[..., :24, :24].mean(1).flatten() for i in seen]
    for (i, a), (j, b) in itertools.combinations(enumerate(small), 2):
        assert (a - b).abs().mean() > 1e-3, (i, j)


def test_build_is_deterministic(built):
    _, first, other, sources = built
    footage.build(other, sources=sources, **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".mp4"]) == len(PICK) * SMALL["clips"]
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for f in files:
        assert (first / f).read_bytes() == (other / f).read_bytes(), f


def test_clips_are_distinct_moving_footage(built):
    _, root, _, _ = built
    cfg = DecodeConfig(window=6, stride=2, clips_per_video=1, short_side=64)
    clips = {p.name: decode_clips(str(p), cfg)[0][1].astype(np.float32) for p in sorted(root.rglob("*.mp4"))}
    assert all(c.shape == (6, 64, 64, 3) for c in clips.values())
    for (na, a), (nb, b) in itertools.combinations(clips.items(), 2):
        assert np.abs(a - b).mean() > 2.0, (na, nb)                      # distinct clips
    for name, c in clips.items():
        if not name.startswith("carphone"):
            assert np.abs(c[0] - c[-1]).mean() > 1.0, name               # the camera moves


def test_manifest_is_read_by_the_sources_stage_with_one_split_per_source(built):
    record, root, _, sources = built
    rows = list(csv.DictReader((root / "manifest.csv").read_text().splitlines()))
    videos = list_videos(SourcesConfig(manifest=str(root / "manifest.csv"), labels="manifest"))
    assert len(videos) == len(rows) == len(PICK) * SMALL["clips"]
    by_path = {r["path"]: r for r in rows}
    split_of = {}
    for v in videos:
        row = by_path[str(v["path"]).split(str(root) + "/")[-1]]
        assert v["label"] == row["label"] == next(s.group for s in sources if s.name == row["source"])
        assert v["split"] == row["split"]
        split_of.setdefault(row["source"], set()).add(v["split"])
    assert all(len(s) == 1 for s in split_of.values())                  # no source on both sides
    assert {s.pop() for s in split_of.values()} == {"train", "val"}
    assert {r["split"] for r in record["sources"].values()} == {"train", "val"}


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="clips"):
        footage.build(tmp_path / "x", sources=list(footage.SOURCES[:2]), clips=0)
    with pytest.raises(SystemExit):
        footage.main(["--out", str(tmp_path / "y"), "--sources", "nope"])
    assert not (tmp_path / "x").exists()
