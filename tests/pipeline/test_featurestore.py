"""Feature store: raw-bytes round trip, commit protocol, statistics, readers, s3 (moto server),
codecs in the store (one per column, recorded, never mixed; unknown ones refused)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import codecs
from pipeline.featurestore import FeatureStore, binary_to_numpy, tensor_to_binary
from pipeline.storage import Storage
from tokconv.targets import TargetSpec

SPECS = {
    "student": TargetSpec("student", 16, 8, (1, 4, 4)),
    "vivit": TargetSpec("vivit", 1, 6, None),
}


def make_batch(rng, video_ids, clip_indices, split="train", scale=3.0):
    n = len(video_ids)
    return {
        "video_id": np.array(video_ids),
        "clip_index": np.array(clip_indices),
        "label_index": np.arange(n) % 3,
        "split": np.array([split] * n),
        # offset + scale so the std test is not trivially 1
        "student": (rng.standard_normal((n, 16, 8)) * scale + 5).astype(np.float16),
        "vivit": rng.standard_normal((n, 1, 6)).astype(np.float16),
    }


def new_store(tmp_path, name="feat"):
    store = FeatureStore(Storage(str(tmp_path)), name)
    store.write_meta(
        specs=SPECS, dtype="float16", class_names=["a", "b", "c"], sources={"student": "tiny"}
    )
    return store


def test_binary_column_round_trip_is_exact_and_zero_copy():
    x = np.random.default_rng(0).standard_normal((5, 7, 3)).astype(np.float16)
    col = tensor_to_binary(x)
    assert col.type == pa.large_binary() and len(col) == 5 and len(col[0].as_py()) == 7 * 3 * 2
    y = binary_to_numpy(col, (7, 3), "float16")
    np.testing.assert_array_equal(x, y)
    # a sliced column (offset != 0) and an int32-offset binary column decode too
    np.testing.assert_array_equal(binary_to_numpy(col.slice(2, 2), (7, 3), "float16"), x[2:4])
    small = pa.array([r.tobytes() for r in x], pa.binary())
    np.testing.assert_array_equal(binary_to_numpy(small, (7, 3), "float16"), x)


def test_binary_column_rejects_wrong_lengths():
    col = pa.array([b"\x00" * 4, b"\x00" * 6], pa.binary())
    with pytest.raises(ValueError, match="not all 4 bytes"):
        binary_to_numpy(col, (2,), "float16")


def test_bfloat16_round_trip_through_store(tmp_path):
    store = FeatureStore(Storage(str(tmp_path)), "bf")
    store.write_meta(specs={"student": SPECS["student"]}, dtype="bfloat16", class_names=[])
    x = torch.randn(3, 16, 8).to(torch.bfloat16)
    store.write_shard(
        {
            "video_id": ["v"] * 3,
            "clip_index": [0, 1, 2],
            "label_index": [0] * 3,
            "split": ["train"] * 3,
            "student": x,
        }
    )
    (batch,) = list(store.iter_torch(batch_size=8))
    assert batch["student"].dtype == torch.bfloat16
    assert torch.equal(batch["student"], x)


def test_write_read_round_trip_exact(tmp_path):
    rng = np.random.default_rng(1)
    store = new_store(tmp_path)
    b1 = make_batch(rng, ["v1", "v1", "v2"], [0, 1, 0])
    b2 = make_batch(rng, ["v3", "v3"], [0, 1], split="val")
    info = store.write_shard(b1)
    store.write_shard(b2)
    assert info["rows"] == 3 and info["bytes"] > 3 * (16 * 8 + 6) * 2
    assert store.done_clips() == {"v1": {0, 1}, "v2": {0}, "v3": {0, 1}}
    batches = list(store.iter_torch(batch_size=2))
    assert [len(b["video_id"]) for b in batches] == [2, 2, 1]  # re-chunked across shards
    got = {
        k: torch.cat([b[k] for b in batches])
        for k in ("student", "vivit", "clip_index", "label_index")
    }
    want_student = np.concatenate([b1["student"], b2["student"]])
    # commit order is by shard id (timestamp + uuid), so compare as a set keyed by (video, clip)
    got_keys = [(v, int(c)) for b in batches for v, c in zip(b["video_id"], b["clip_index"])]
    want_keys = [
        (v, int(c))
        for v, c in zip([*b1["video_id"], *b2["video_id"]], [*b1["clip_index"], *b2["clip_index"]])
    ]
    assert sorted(got_keys) == sorted(want_keys)
    for i, key in enumerate(got_keys):
        j = want_keys.index(key)
        assert torch.equal(got["student"][i], torch.from_numpy(want_student[j]))
    assert got["student"].dtype == torch.float16 and got["student"].shape == (5, 16, 8)
    assert got["vivit"].shape == (5, 1, 6)
    val = list(store.iter_torch(split="val", batch_size=8))
    assert (
        len(val) == 1 and val[0]["video_id"] == ["v3", "v3"] and val[0]["split"] == ["val", "val"]
    )
    assert torch.equal(val[0]["student"], torch.from_numpy(b2["student"]))
    assert store.num_clips() == 5 and store.num_clips("val") == 2


def test_commit_protocol_ignores_and_cleans_uncommitted_shards(tmp_path):
    rng = np.random.default_rng(2)
    store = new_store(tmp_path)
    store.write_shard(make_batch(rng, ["a"], [0]))
    info = store.write_shard(make_batch(rng, ["b", "b"], [0, 1]))
    # simulate a crash after the move but before the commit record, and one mid-write
    store.storage.fs.rm(store.storage.path("commits", f"{info['shard']}.json"))
    store.storage.write_bytes("shards/_tmp/deadbeef.parquet", b"partial")
    assert store.done_clips() == {"a": {0}}
    assert [b["video_id"] for b in store.iter_torch(batch_size=8)] == [["a"]]
    removed = store.cleanup()
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == sorted(
        [f"{info['shard']}.parquet", "deadbeef.parquet"]
    )
    assert store.storage.ls("shards/_tmp") == []
    assert len([n for n in store.storage.ls("shards") if n.endswith(".parquet")]) == 1
    assert store.cleanup() == []


def test_stats_match_numpy(tmp_path):
    rng = np.random.default_rng(3)
    store = new_store(tmp_path)
    batches = [
        make_batch(rng, ["a", "b"], [0, 0]),
        make_batch(rng, ["c"], [0]),
        make_batch(rng, ["d"], [0], split="val", scale=10.0),
    ]
    # the second shard passes upstream sums (the GPU path); they must combine the same way
    from pipeline.featurestore import SQ_PREFIX, SUM_PREFIX, channel_sums

    for k in ("student", "vivit"):
        s, q = channel_sums(batches[1][k])
        batches[1][SUM_PREFIX + k], batches[1][SQ_PREFIX + k] = s, q
    for b in batches:
        store.write_shard(b)
    stats = store.compute_stats()
    assert set(stats) == {"train", "val", "all"}
    for split, idx in (("train", [0, 1]), ("all", [0, 1, 2])):
        for k in ("student", "vivit"):
            x = (
                np.concatenate([batches[i][k] for i in idx])
                .astype(np.float64)
                .reshape(-1, batches[0][k].shape[-1])
            )
            np.testing.assert_allclose(stats[split][k]["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(stats[split][k]["std"], x.std(0), rtol=1e-9)
            assert stats[split][k]["count"] == x.shape[0]
    loaded = store.stats()  # train by default
    assert loaded["student"]["mean"].shape == (8,)
    np.testing.assert_array_equal(loaded["student"]["std"], stats["train"]["student"]["std"])
    assert not np.allclose(
        loaded["student"]["std"], stats["all"]["student"]["std"]
    )  # val (scale 10) excluded
    assert json.loads(store.storage.read_bytes("stats.json"))["val"]["vivit"]["count"] == 1


def test_failures_recorded_and_cleared(tmp_path):
    store = new_store(tmp_path)
    store.record_failure(
        {"video_id": "x1", "path": "/v/x1.mp4", "label": "a"}, "truncated: no frames"
    )
    store.record_failure({"video_id": "x2", "path": "/v/x2.mp4"}, "too short")
    f = store.failed()
    assert (
        set(f) == {"x1", "x2"}
        and f["x1"]["reason"] == "truncated: no frames"
        and f["x2"]["path"] == "/v/x2.mp4"
    )
    store.clear_failure("x1")
    assert set(store.failed()) == {"x2"}


def test_to_torch_on_ray_numpy_batches(tmp_path):
    """Ray's numpy batch format gives binary columns as object arrays of bytes."""
    rng = np.random.default_rng(4)
    store = new_store(tmp_path)
    b = make_batch(rng, ["a", "b"], [0, 3])
    out = store.to_torch(
        {
            "student": np.array([r.tobytes() for r in b["student"]], dtype=object),
            "clip_index": np.array([0, 3]),
            "video_id": np.array(["a", "b"]),
        }
    )
    assert torch.equal(out["student"], torch.from_numpy(b["student"]))
    assert out["clip_index"].tolist() == [0, 3] and out["video_id"] == ["a", "b"]


def test_meta_and_specs(tmp_path):
    store = new_store(tmp_path)
    fresh = FeatureStore(Storage(str(tmp_path)), "feat")
    assert fresh.specs() == SPECS
    assert fresh.read_meta()["tensors"]["student"] == {"shape": [16, 8], "dtype": "float16"}
    assert fresh.read_meta()["class_names"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="plain name"):
        FeatureStore(Storage(str(tmp_path)), "a/b")
    assert store.storage.url() == str(tmp_path / "features" / "feat")


@pytest.mark.integration
def test_s3_round_trip(s3_server):
    bucket = s3_server.make_bucket("fs")
    store = FeatureStore(Storage(f"s3://{bucket}/run", s3_server.storage_options), "feat")
    store.write_meta(specs=SPECS, dtype="float16", class_names=["a"])
    rng = np.random.default_rng(5)
    b = make_batch(rng, ["a", "b", "c"], [0, 0, 1])
    store.write_shard(b)
    store.storage.write_bytes("shards/_tmp/orphan.parquet", b"x")
    store.record_failure({"video_id": "z", "path": "s3://x/z.mp4"}, "bad")
    store.compute_stats()
    fresh = FeatureStore(Storage(f"s3://{bucket}/run", s3_server.storage_options), "feat")
    assert fresh.done_clips() == {"a": {0}, "b": {0}, "c": {1}}
    # another process commits a shard: listings must not come from s3fs's cache
    other, (rec,) = s3_server.fs(), fresh.commits()
    other.copy(
        f"{bucket}/run/features/feat/commits/{rec['shard']}.json",
        f"{bucket}/run/features/feat/commits/zz.json",
    )
    assert len(fresh.commits()) == 2
    other.rm(f"{bucket}/run/features/feat/commits/zz.json")
    assert len(fresh.commits()) == 1
    assert set(fresh.failed()) == {"z"}
    (batch,) = list(fresh.iter_torch(batch_size=8))
    assert torch.equal(batch["student"], torch.from_numpy(b["student"]))
    assert len(fresh.cleanup()) == 1
    assert np.allclose(
        fresh.stats()["vivit"]["mean"], b["vivit"].astype(np.float64).reshape(-1, 6).mean(0)
    )


def test_rewrite_of_same_rows_is_idempotent_and_duplicates_are_reported(tmp_path):
    rng = np.random.default_rng(6)
    store = new_store(tmp_path)
    b = make_batch(rng, ["a", "b"], [0, 1])
    first = store.write_shard(b)
    again = store.write_shard(
        {**b, "student": b["student"] + 1}
    )  # a retried task: same rows, same shard id
    assert first["shard"] == again["shard"] and len(store.commits()) == 1
    assert len([n for n in store.storage.ls("shards") if n.endswith(".parquet")]) == 1
    (batch,) = list(store.iter_torch(batch_size=8))
    assert torch.equal(batch["student"], torch.from_numpy(b["student"] + 1))  # the later write wins
    assert store.duplicates() == {}
    other = store.write_shard(make_batch(rng, ["b", "c"], [1, 0]))  # regrouped: ("b", 1) twice
    dups = store.duplicates()
    assert list(dups) == [("b", 1)] and sorted(dups[("b", 1)]) == sorted(
        [first["shard"], other["shard"]]
    )


def test_shards_keep_statistics_for_id_columns_only(tmp_path):
    """min/max of raw tensor bytes mean nothing and cost half a writer's CPU: only ids get
    statistics."""
    store = new_store(tmp_path)
    info = store.write_shard(make_batch(np.random.default_rng(2), ["v1", "v2"], [0, 0]))
    meta = pq.ParquetFile(tmp_path / "features" / "feat" / info["path"]).metadata
    stats = {
        meta.schema.column(i).name: meta.row_group(0).column(i).is_stats_set
        for i in range(meta.num_columns)
    }
    assert stats == {
        "video_id": True,
        "clip_index": True,
        "label_index": True,
        "split": True,
        "student": False,
        "vivit": False,
    }


# ---------------------------------------------------------------- codecs (issue 15)


def fp8_store(tmp_path, name="f8", codec="fp8"):
    store = FeatureStore(Storage(str(tmp_path)), name)
    store.write_meta(specs=SPECS, dtype="float16", class_names=["a", "b", "c"], codec=codec)
    return store


def by_key(store, split=None):
    """{(video_id, clip_index): {column: tensor}} over the store (commit order differs by store)."""
    out = {}
    for b in store.iter_torch(split=split, batch_size=3):
        for i, (v, c) in enumerate(zip(b["video_id"], b["clip_index"].tolist())):
            out[(v, c)] = {k: b[k][i] for k in ("student", "vivit")}
    return out


def fp8_bound(x: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp8 codec's stated bound per element (codecs.py), plus float16 output rounding."""
    return 2**-4 * x.abs() + 2**-10 * scale + 2**-11 * x_hat.abs() + 2**-25


def test_fp8_store_round_trips_within_its_bound_and_keeps_the_raw_statistics(tmp_path):
    rng = np.random.default_rng(7)
    batches = [
        make_batch(rng, ["a", "a", "b"], [0, 1, 0]),
        make_batch(rng, ["c"], [0], split="val"),
    ]
    raw, f8 = new_store(tmp_path), fp8_store(tmp_path)
    for b in batches:
        raw.write_shard(b)
        f8.write_shard(b)
    assert f8.layouts() == {
        "student": {"shape": [16, 8], "dtype": "float16", "codec": "fp8"},
        "vivit": {"shape": [1, 6], "dtype": "float16", "codec": "raw"},
    }
    assert FeatureStore(Storage(str(tmp_path)), "f8").read_meta()["codec"] == {
        "student": "fp8",
        "vivit": "raw",
    }
    # statistics come from the values before encoding: the same for both codecs
    assert f8.compute_stats() == raw.compute_stats()
    want, got = by_key(raw), by_key(f8)
    assert got.keys() == want.keys()
    for key, w in want.items():
        x, x_hat = w["student"].double(), got[key]["student"]
        assert x_hat.dtype == torch.float16  # the layout's dtype, as for raw
        scale = x.abs().amax(0) / 448
        assert bool(((x_hat.double() - x).abs() <= fp8_bound(x, x_hat.double(), scale)).all()), key
        assert not torch.equal(x_hat, w["student"])  # it is quantised
        assert torch.equal(got[key]["vivit"], w["vivit"])  # single token: stays raw
    # the student column holds 4*8 bytes of scales + 16*8 codes per clip instead of 16*8*2
    table = pq.read_table(f8.shard_paths()[0])
    assert {len(v) for v in table.column("student").to_pylist()} == {4 * 8 + 16 * 8}
    assert sum(r["bytes"] for r in f8.commits()) < sum(r["bytes"] for r in raw.commits())
    # the training reader's path: stored rows (views) decoded by codecs.decode_columns
    rows = f8.stored_rows(table)
    assert rows["student"].dtype == torch.uint8 and rows["student"].shape == (table.num_rows, 160)
    dec = codecs.decode_columns(rows, f8.layouts(), torch.float16)
    host = f8.to_torch(table)
    assert torch.equal(dec["student"], host["student"]) and torch.equal(dec["vivit"], host["vivit"])
    assert f8.to_torch(table, torch.float32)["student"].dtype == torch.float32


def test_a_model_actor_table_is_encoded_in_the_stores_codec_with_its_upstream_sums(tmp_path):
    """The extract path: raw float16 bytes + GPU channel sums, no layout metadata (Ray drops it);
    rows already encoded upstream (e.g. on the GPU) are recognised by their width."""
    from pipeline.featurestore import SQ_PREFIX, SUM_PREFIX, channel_sums, id_columns

    rng = np.random.default_rng(8)
    f8 = fp8_store(tmp_path)
    b = make_batch(rng, ["a", "b"], [0, 0])
    s, q = channel_sums(b["student"])
    vs, vq = channel_sums(b["vivit"])
    table = pa.table(
        {
            **id_columns(b),
            "student": tensor_to_binary(b["student"]),
            "vivit": tensor_to_binary(b["vivit"]),
            SUM_PREFIX + "student": tensor_to_binary(s),
            SQ_PREFIX + "student": tensor_to_binary(q),
            SUM_PREFIX + "vivit": tensor_to_binary(vs),
            SQ_PREFIX + "vivit": tensor_to_binary(vq),
        }
    )
    f8.write_shard(table)
    (rec,) = f8.commits()
    assert rec["tensors"]["student"]["codec"] == "fp8"
    np.testing.assert_allclose(rec["sums"]["train"]["student"]["sum"], s.sum(0))
    (batch,) = list(f8.iter_torch(batch_size=8))
    x = torch.from_numpy(b["student"]).double()
    scale = x.abs().amax(1, keepdim=True) / 448
    assert bool(
        (
            (batch["student"].double() - x).abs() <= fp8_bound(x, batch["student"].double(), scale)
        ).all()
    )

    b2 = make_batch(rng, ["c"], [0])
    pre = codecs.encode(torch.from_numpy(b2["student"]), "fp8")
    f8.write_shard(
        pa.table(
            {
                **id_columns(b2),
                "student": tensor_to_binary(pre.numpy()),
                "vivit": tensor_to_binary(b2["vivit"]),
            }
        )
    )
    got = by_key(f8)[("c", 0)]["student"]
    assert torch.equal(got, codecs.decode(pre, f8.layouts()["student"])[0])


def test_codecs_are_never_mixed_in_one_store(tmp_path):
    rng = np.random.default_rng(9)
    store = new_store(tmp_path)
    kw = {"specs": SPECS, "dtype": "float16", "class_names": ["a", "b", "c"]}
    store.write_meta(**kw, codec="fp8")  # nothing committed yet: the codec may still change
    store.write_meta(**kw)
    store.write_shard(make_batch(rng, ["a"], [0]))
    with pytest.raises(
        ValueError,
        match=r"holds codecs \{'student': 'raw'.*this job writes \{'student': "
        r"'fp8'.*never mixed in one store.*pipeline reencode",
    ):
        store.write_meta(**kw, codec="fp8")
    assert store.read_meta(fresh=True)["codec"]["student"] == "raw"
    # a table already encoded in another codec is refused by the writer too
    encoded = fp8_store(tmp_path).encode(make_batch(rng, ["b"], [0]))
    with pytest.raises(ValueError, match="'student' arrives in codec fp8, the store .* holds raw"):
        store.write_shard(encoded)


def test_a_reader_refuses_a_codec_it_does_not_know(tmp_path):
    store = fp8_store(tmp_path)
    store.write_shard(make_batch(np.random.default_rng(10), ["a"], [0]))
    meta = store.storage.read_json("meta.json")
    meta["codec"]["student"] = "fp4_e2m1"
    store.storage.write_json("meta.json", meta)
    fresh = FeatureStore(Storage(str(tmp_path)), "f8")
    msg = r"column 'student': unknown feature codec 'fp4_e2m1'; known codecs: raw, fp8, int8"
    with pytest.raises(ValueError, match=msg):
        list(fresh.iter_torch())
    with pytest.raises(ValueError, match=msg):
        fresh.layouts()


def test_a_store_written_before_codecs_reads_as_raw(tmp_path):
    rng = np.random.default_rng(11)
    store = new_store(tmp_path)
    b = make_batch(rng, ["a", "b"], [0, 0])
    info = store.write_shard(b)
    meta = store.storage.read_json("meta.json")  # what such a store holds: no codec anywhere
    del meta["codec"]
    store.storage.write_json("meta.json", meta)
    rec = store.storage.read_json(f"commits/{info['shard']}.json")
    rec["tensors"] = {
        k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in rec["tensors"].items()
    }
    store.storage.write_json(f"commits/{info['shard']}.json", rec)
    old = FeatureStore(Storage(str(tmp_path)), "feat")
    assert {k: v["codec"] for k, v in old.layouts().items()} == {"student": "raw", "vivit": "raw"}
    (batch,) = list(old.iter_torch(batch_size=8))
    assert torch.equal(batch["student"], torch.from_numpy(b["student"]))
    kw = {"specs": SPECS, "dtype": "float16", "class_names": ["a", "b", "c"]}
    old.write_meta(**kw)  # a re-run of the extraction (raw): accepted
    with pytest.raises(ValueError, match="never mixed"):
        old.write_meta(**kw, codec="int8")
    old.write_shard(make_batch(rng, ["c"], [0]))
    assert old.num_clips() == 3


def test_unchanged_meta_is_not_rewritten(tmp_path):
    new_store(tmp_path)
    path = tmp_path / "features" / "feat" / "meta.json"
    before, stamp = path.read_bytes(), path.stat().st_mtime_ns
    again = FeatureStore(Storage(str(tmp_path)), "feat").write_meta(
        specs=SPECS, dtype="float16", class_names=["a", "b", "c"], sources={"student": "tiny"}
    )
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert again["codec"] == {"student": "raw", "vivit": "raw"}
