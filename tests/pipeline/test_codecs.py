"""Feature codecs: round trips within each codec's stated bound on REAL feature pairs (tiny
transformers backbones on the real sample videos), per-channel scales, realistic value ranges,
column resolution, config validation, an fp8 store through the smoke job end to end (CLI), and
fp8z (fp8's rows, zstd-compressed by Parquet): its columns compressed, its values fp8's, fewer
file bytes than fp8 on the real pairs, the training reader's batches, trained and evaluated."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from tiny_features import SPECS, make_tiny_store

from pipeline import codecs
from pipeline.config import ConfigError, load_job
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage

REPO = Path(__file__).parents[2]
# rounding of the decoded value to the output dtype: relative, and absolute (fp16 subnormals)
OUT_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OUT_ABS = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}


@pytest.fixture(scope="module")
def real_pairs(sample_videos) -> dict[str, torch.Tensor]:
    """{model: (4, N, D) float16}: the four tiny backbones (full token layouts) on two clips each of
    two real sample videos, as the extract stage stores them."""
    from pipeline.backbones import FeatureExtractor
    from pipeline.config import DecodeConfig, ModelsConfig
    from pipeline.decode import decode_clips

    cfg = DecodeConfig(window=32, stride=2, clips_per_video=2, short_side=256)
    clips = [c for name in ("animation/bigbuckbunny.mp4", "outdoor/bikes.mp4")
             for _, c in decode_clips(str(sample_videos / name), cfg)]
    fx = FeatureExtractor(ModelsConfig(weights="tiny", device="cpu", dtype="float32"))
    with torch.inference_mode():
        out = fx(torch.from_numpy(np.stack(clips)))
    return {k: v.to(torch.float16) for k, v in out.items()}


def bound(codec: str, x: torch.Tensor, x_hat: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The stated per-element error bound of ``codec`` for input x (B, N, D) and its decoding (plus
    the output dtype's rounding and float32 arithmetic)."""
    x, x_hat = x.double(), x_hat.double()
    amax = x.abs().amax(1, keepdim=True)
    out = OUT_EPS[out_dtype] * x_hat.abs() + OUT_ABS[out_dtype] + 2.0**-22 * x.abs() + 1e-37
    if codec == "raw":
        return out
    if codec in ("fp8", "fp8z"):
        return 2.0**-4 * x.abs() + 2.0**-10 * amax / 448 + out
    return amax / 127 / 2 + out


@pytest.mark.parametrize("codec", list(codecs.CODECS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_the_stated_bound_on_real_pairs(real_pairs, codec, out_dtype):
    stats = {}
    for name, x in real_pairs.items():
        if x.shape[1] == 1 and codecs.CODECS[codec].scaled:
            continue  # single-token columns stay raw (test_single_token_columns_stay_raw)
        layout = {"shape": list(x.shape[1:]), "dtype": "float16", "codec": codec}
        rows = codecs.encode(x, codec)
        assert rows.dtype == torch.uint8 and rows.shape == (x.shape[0], codecs.row_bytes(layout))
        x_hat = codecs.decode(rows, layout, out_dtype)
        assert x_hat.dtype == out_dtype and x_hat.shape == x.shape
        err = (x_hat.double() - x.double()).abs()
        assert bool(torch.isfinite(x_hat).all())
        assert bool((err <= bound(codec, x, x_hat, out_dtype)).all()), (name, float(err.max()))
        rel = float(err.mean() / x.double().abs().mean())
        cos = float(F.cosine_similarity(x_hat.double(), x.double(), dim=-1).mean())
        stats[name] = (float(err.max()), rel, cos)
    # mean |error| / mean |x| measured on these pairs: fp8 0.0227 (3 mantissa bits), int8
    # 0.0064-0.0071 (8 bits over each channel's absmax), token cosine 0.99966 and 0.99998
    for name, (max_err, rel, cos) in stats.items():
        if codec == "raw" and out_dtype != torch.bfloat16:
            assert max_err == 0.0, name
        elif codec in ("fp8", "fp8z"):
            assert 0.018 < rel < 0.028 and cos > 0.9995, (name, rel, cos)
        elif codec == "int8":
            assert rel < 0.009 and cos > 0.99997, (name, rel, cos)


def test_scales_are_stored_and_applied_per_channel():
    """Channels 8 orders of magnitude apart each keep their relative precision, because each has
    its own scale (stored as float32 absmax_c / 448 before the codes); one scale per clip would
    flush the small channels to zero."""
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-4, 4, 16, dtype=torch.float64)
    x = (torch.randn(3, 64, 16, generator=g, dtype=torch.float64) * mags).float()
    rows = codecs.encode(x, "fp8")
    scales = rows[:, :4 * 16].contiguous().view(torch.float32)
    torch.testing.assert_close(scales, x.abs().amax(1) / 448, rtol=1e-7, atol=0)
    x_hat = codecs.decode(rows, {"shape": [64, 16], "dtype": "float32", "codec": "fp8"})
    rel = ((x_hat - x).norm(dim=1) / x.norm(dim=1))  # (B, D): per channel
    assert float(rel.max()) < 2.0**-4 and float(rel.min()) > 0
    # the same codes under one shared scale: the 1e-4 channels fall below e4m3's range
    shared = x.abs().amax((1, 2), keepdim=True) / 448
    flat = (x / shared).to(torch.float8_e4m3fn).float() * shared
    assert float(((flat - x).norm(dim=1) / x.norm(dim=1))[:, 0].min()) > 0.5


@pytest.mark.parametrize("codec", ["fp8", "int8"])
def test_outliers_zero_channels_zero_rows_and_fp16_extremes_stay_finite(codec):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 8, generator=g)
    x[0, 5, 2] = 3000.0                       # one outlier token in a channel
    x[:, :, 4] = 0.0                          # a zero channel
    x[1] = 0.0                                # a zero row (an all-zero clip)
    x[2, :, 6] = torch.tensor(6e-8)           # fp16 subnormals
    x[3, 0, 7], x[3, 1, 7] = 65504.0, -65504.0  # fp16 extremes
    x = x.half()
    x_hat = codecs.decode(codecs.encode(x, codec), {"shape": [32, 8], "dtype": "float16",
                                                    "codec": codec}, torch.float32)
    assert bool(torch.isfinite(x_hat).all())
    assert torch.equal(x_hat[:, :, 4], torch.zeros(4, 32))
    assert torch.equal(x_hat[1], torch.zeros(32, 8))
    err = (x_hat.double() - x.double()).abs()
    assert bool((err <= bound(codec, x, x_hat, torch.float32)).all())
    assert float(x_hat[3, 0, 7]) == pytest.approx(65504.0, rel=1e-6)
    assert float(x_hat[0, 5, 2]) == pytest.approx(3000.0, rel=1e-6)  # the channel's max: exact


def test_an_outlier_token_costs_int8_its_channel_but_not_fp8():
    """One token 1000x the others in a channel (trained ViTs have such high-norm tokens): int8's
    absmax scale flushes the rest of the channel to zero; fp8 keeps them to its relative bound."""
    x = torch.rand(1, 64, 4, generator=torch.Generator().manual_seed(2)) + 0.5
    x[0, 7, :] = 1000.0
    layout = {"shape": [64, 4], "dtype": "float32"}
    fp8 = codecs.decode(codecs.encode(x, "fp8"), {**layout, "codec": "fp8"})
    int8 = codecs.decode(codecs.encode(x, "int8"), {**layout, "codec": "int8"})
    rest = torch.ones(64, dtype=torch.bool)
    rest[7] = False
    assert float(((fp8 - x).abs() / x)[0, rest].max()) <= 2**-4
    assert torch.equal(int8[0, rest], torch.zeros(63, 4))  # every value below scale/2 = 3.9


def test_non_finite_input_is_refused():
    x = torch.zeros(1, 4, 2)
    x[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        codecs.encode(x, "fp8")
    x[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        codecs.encode(x, "int8")


def test_decode_checks_the_row_width():
    rows = codecs.encode(torch.ones(2, 4, 3), "fp8")
    with pytest.raises(ValueError, match="expected uint8 rows of 24 bytes"):
        codecs.decode(rows[:, :-1], {"shape": [4, 3], "dtype": "float32", "codec": "fp8"})


def test_decode_columns_gives_every_column_in_the_asked_dtype(real_pairs):
    layouts = {k: {"shape": list(v.shape[1:]), "dtype": "float16", "codec": c}
               for (k, v), c in zip(real_pairs.items(), ["fp8", "int8", "raw", "raw"])}
    raw = {k: codecs.encode(v, layouts[k]["codec"]) for k, v in real_pairs.items()}
    out = codecs.decode_columns(raw, layouts, torch.bfloat16)
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        k: (torch.bfloat16, v.shape) for k, v in real_pairs.items()}
    assert torch.equal(out["timesformer"], real_pairs["timesformer"].to(torch.bfloat16))
    # raw columns may also come as tensors in their stored dtype (the reader before codecs)
    assert torch.equal(codecs.decode(real_pairs["vivit"], layouts["vivit"], torch.float32),
                       real_pairs["vivit"].float())


@pytest.mark.gpu
def test_decode_on_the_gpu_matches_the_host(real_pairs):
    for codec in codecs.CODECS:
        x = real_pairs["student"]
        layout = {"shape": list(x.shape[1:]), "dtype": "float16", "codec": codec}
        rows = codecs.encode(x, codec)
        on_gpu = codecs.decode_columns({"s": rows.cuda()}, {"s": layout}, torch.float32)["s"]
        assert on_gpu.is_cuda
        assert torch.equal(on_gpu.cpu(), codecs.decode(rows, layout, torch.float32))
        assert torch.equal(codecs.encode(x.cuda(), codec).cpu(), rows)


def test_resolve_codecs_per_column():
    shapes = {"student": (2048, 1024), "videomae": (1568, 768), "vivit": (1, 768)}
    assert codecs.resolve_codecs("fp8", shapes) == {
        "student": "fp8", "videomae": "fp8", "vivit": "raw"}
    assert codecs.resolve_codecs(None, shapes) == dict.fromkeys(shapes, "raw")
    assert codecs.resolve_codecs({"student": "raw", "default": "int8"}, shapes) == {
        "student": "raw", "videomae": "int8", "vivit": "raw"}
    with pytest.raises(ValueError, match="unknown column.*studnet"):
        codecs.resolve_codecs({"studnet": "fp8"}, shapes)
    with pytest.raises(ValueError, match="feature codec 'fp4'; known codecs: raw, fp8, int8"):
        codecs.resolve_codecs({"videomae": "fp4"}, shapes)
    with pytest.raises(ValueError, match="'vivit': fp8 needs more than one token"):
        codecs.resolve_codecs({"vivit": "fp8"}, shapes)
    full = {"student": (2048, 1024), "videomae": (1568, 768), "timesformer": (3136, 768),
            "vivit": (1, 768)}
    layouts = {k: {"shape": list(s), "dtype": "float16", "codec": c}
               for k, s in full.items() for c in [codecs.resolve_codecs("fp8", full)[k]]}
    fp16 = sum(2 * n * d for n, d in full.values())
    fp8 = sum(map(codecs.row_bytes, layouts.values()))  # full-size clip: the scales cost 0.1%
    assert fp16 == 11_421_184 and fp8 / fp16 == pytest.approx(0.50096, abs=1e-5)


def test_extract_codec_is_validated_at_load():
    assert load_job(None, ["extract.codec=fp8"]).extract.codec == "fp8"
    assert load_job(None, ["extract.codec={student: fp8, default: raw}"]).extract.codec == {
        "student": "fp8", "default": "raw"}
    with pytest.raises(ConfigError, match=r"extract.codec: .*codec 'fp4'; known codecs: raw, fp8"):
        load_job(None, ["extract.codec=fp4"])
    with pytest.raises(ConfigError, match=r"extract.codec: .*column\(s\) stud; known: student"):
        load_job(None, ["extract.codec={stud: fp8}"])


@pytest.mark.integration
def test_smoke_job_with_an_fp8_store_trains_and_evaluates_through_the_cli(tmp_path):
    """extract.codec={student: fp8z, default: fp8} through the CLI: the store records each
    column's codec, holds at most about half the bytes of the raw values, trains (the training
    reader decodes the rows on the training device, pyarrow decompressing fp8z's chunks) and
    evaluates; then a re-encode to raw gives the same statistics."""
    env = {"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", "jobs/smoke.yaml",
                          "extract.codec={student: fp8z, default: fp8}", f"storage.url={tmp_path}",
                          "train.epochs=1",
                          "--stages", "extract,train,evaluate"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = tmp_path / "features" / "features"
    meta = json.loads((store / "meta.json").read_text())
    assert meta["codec"] == {"student": "fp8z", "videomae": "fp8", "timesformer": "fp8",
                             "vivit": "raw"}
    commits = [json.loads(p.read_text()) for p in (store / "commits").glob("*.json")]
    assert commits and all(r["tensors"]["student"]["codec"] == "fp8z" for r in commits)
    raw_bytes = sum(2 * np.prod(v["shape"]) for v in meta["tensors"].values())
    per_clip = sum(r["bytes"] for r in commits) / sum(r["rows"] for r in commits)
    assert 0.3 < per_clip / raw_bytes < 0.5  # fp8 is 0.5 + its scales; zstd takes the student below
    metrics = json.loads((tmp_path / "runs" / "smoke" / "eval" / "metrics.json").read_text())
    assert metrics["clips"] >= 1 and -1 <= metrics["mean_cosine"] <= 1
    assert np.isfinite(metrics["mean_r2"])
    assert set(metrics["targets"]) == {"videomae", "timesformer", "vivit"}

    back = subprocess.run([sys.executable, "-m", "pipeline", "reencode", "jobs/smoke.yaml",
                           "--codec", "raw", "--to", "features-raw", f"storage.url={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert back.returncode == 0, back.stderr[-3000:]
    raw_store = tmp_path / "features" / "features-raw"
    stats = json.loads((store / "stats.json").read_text())
    assert json.loads((raw_store / "stats.json").read_text()) == stats
    assert json.loads((raw_store / "meta.json").read_text())["codec"]["student"] == "raw"


# ---------------------------------------------------------------------------- fp8z (compressed)

def _real_store(tmp_path: Path, pairs: dict[str, torch.Tensor], codec: str) -> FeatureStore:
    """A one-shard store of ``pairs`` (the tiny backbones' layouts) in ``codec``."""
    from pipeline.backbones import layout_spec, model_configs
    from pipeline.config import ModelsConfig

    specs = {k: layout_spec(k, c) for k, c in model_configs(ModelsConfig(weights="tiny")).items()}
    store = FeatureStore(Storage(str(tmp_path)), f"real-{codec}")
    store.write_meta(specs=specs, dtype="float16", class_names=["a", "b"], codec=codec)
    n = len(pairs["student"])
    store.write_shard({"video_id": [f"v{i}" for i in range(n)], "clip_index": np.arange(n),
                       "label_index": np.zeros(n, np.int32), "split": ["val"] * n,
                       **{k: v.numpy() for k, v in pairs.items()}})
    return store


def test_fp8z_stores_fp8s_rows_compressed_in_fewer_file_bytes_on_real_pairs(real_pairs, tmp_path):
    """The writer zstd-compresses exactly the fp8z columns' chunks (ids and ViViT's raw token stay
    uncompressed: the codec registry's setting, per column); read back, the values are fp8's bit
    for bit (lossless), so within fp8's bound, max and mean; a clip's file bytes are below fp8's."""
    fp8, z = _real_store(tmp_path, real_pairs, "fp8"), _real_store(tmp_path, real_pairs, "fp8z")
    assert z.read_meta()["codec"] == {"student": "fp8z", "videomae": "fp8z",
                                      "timesformer": "fp8z", "vivit": "raw"}
    (path,) = z.shard_paths()
    md = pq.ParquetFile(path).metadata
    chunks = {md.schema.column(i).name: md.row_group(g).column(i).compression
              for g in range(md.num_row_groups) for i in range(md.num_columns)}
    assert chunks == {"video_id": "UNCOMPRESSED", "clip_index": "UNCOMPRESSED",
                      "label_index": "UNCOMPRESSED", "split": "UNCOMPRESSED", "student": "ZSTD",
                      "videomae": "ZSTD", "timesformer": "ZSTD", "vivit": "UNCOMPRESSED"}
    got, ref = next(z.iter_torch(batch_size=8)), next(fp8.iter_torch(batch_size=8))
    for k, x in real_pairs.items():
        assert torch.equal(got[k], ref[k]), k
        if k == "vivit":
            assert torch.equal(got[k], x)
            continue
        err = (got[k].double() - x.double()).abs()
        assert bool((err <= bound("fp8z", x, got[k], torch.float16)).all()), k
        assert 0.018 < float(err.mean() / x.double().abs().mean()) < 0.028, k
    per_clip = {s.name: sum(r["bytes"] for r in s.commits()) / len(real_pairs["student"])
                for s in (fp8, z)}
    raw_bytes = sum(2 * v[0].numel() for v in real_pairs.values())
    # measured on these pairs: fp8 0.50x the fp16 values, fp8z 0.72x fp8's file (0.36x fp16)
    assert per_clip["real-fp8"] / raw_bytes < 0.51
    assert per_clip["real-fp8z"] / per_clip["real-fp8"] < 0.85


def test_the_training_reader_gives_an_fp8z_store_the_fp8_stores_batches(tmp_path):
    """Compressed chunks cannot be read with preadv: the reader reads those row groups with
    pyarrow (which decompresses them) and decodes the rows as fp8's, so an fp8z store of the same
    values yields the fp8 store's batches, tensor for tensor, over two shuffled epochs."""
    from pipeline.train_data import ClipReader
    from pipeline.train_plan import plan_blocks

    storage = Storage(str(tmp_path))
    stores = [make_tiny_store(storage, c, n_train=24, n_val=4, shard_clips=6, codec=c)
              for c in ("fp8", "fp8z")]
    readers = [ClipReader(s, plan_blocks(s, "train"), list(SPECS), rank=0, world=1, batch_size=4,
                          device=torch.device("cpu"), seed=3, window=8) for s in stores]
    block = plan_blocks(stores[1], "train")[0]
    pages = [r._index.pages(s.storage.path(block["path"]), block["rg"])
             for r, s in zip(readers, stores)]
    assert readers[1].direct and pages[0] is not None and pages[1] is None
    for epoch in range(2):
        a, b = (list(r.batches(epoch)) for r in readers)
        assert len(a) == len(b) == 6
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)