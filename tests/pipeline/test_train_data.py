"""The training reader on a real feature store (no cluster): the block plan, one shard per rank,
the epoch order, every cache mode giving exactly the batches of streaming for the same seed, and
an fp8 store decoded by the reader as the host decodes it, within the codec's bound of the values
it encoded."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_features import SPECS, STUDENT, make_tiny_store

from pipeline import codecs
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage
from pipeline.train_data import ClipReader
from pipeline.train_plan import clip_bytes, plan_blocks, rank_segments, resolve_cache

NAMES = list(SPECS)


def _store(storage: Storage, codec: str | None = None) -> FeatureStore:
    # 40 train + 8 val clips in shards of 6: shard 7 mixes both splits
    return make_tiny_store(storage, n_train=40, n_val=8, shard_clips=6, codec=codec)


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return _store(Storage(str(tmp_path)))


def _reader(store, mode, rank, world=2, **kw) -> ClipReader:
    return ClipReader(store, plan_blocks(store, "train"), NAMES, rank=rank, world=world,
                      batch_size=3, device=torch.device("cpu"), seed=5, window=7, cache=mode, **kw)


def _epochs(reader, n=3, start=0):
    return [list(reader.batches(e, start=start if e == 0 else 0)) for e in range(n)]


def _flat(epochs):
    return [b for e in epochs for b in e]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_plan_reads_split_rows_of_each_row_group(store):
    train, val = plan_blocks(store, "train"), plan_blocks(store, "val")
    assert sum(len(b["rows"]) for b in train) == 40 and sum(len(b["rows"]) for b in val) == 8
    assert [(b["path"], b["rg"]) for b in train] == sorted((b["path"], b["rg"]) for b in train)
    mixed = {b["path"] for b in train} & {b["path"] for b in val}
    assert len(mixed) == 1  # the shard holding clips 36..41: 4 train rows, then 2 val rows
    (m,) = [b for b in train if b["path"] in mixed]
    (v,) = [b for b in val if b["path"] in mixed]
    assert (m["rows"], v["rows"]) == ([0, 1, 2, 3], [4, 5])


def test_each_rank_reads_its_own_equal_piece():
    sizes = [4, 6, 6, 6, 6, 6, 6]
    pieces = [rank_segments(sizes, 3, r, seed=1) for r in range(3)]
    clips = [{(b, i) for b, lo, hi in p for i in range(lo, hi)} for p in pieces]
    assert [len(c) for c in clips] == [13, 13, 13]
    assert not (clips[0] & clips[1] or clips[1] & clips[2] or clips[0] & clips[2])
    # seeded: the same every time
    assert pieces == [rank_segments(sizes, 3, r, seed=1) for r in range(3)]
    assert pieces != [rank_segments(sizes, 3, r, seed=2) for r in range(3)]


@pytest.mark.parametrize("codec", [None, "fp8"])
@pytest.mark.parametrize("mode", ["host", "device"])
def test_each_cache_mode_yields_the_streamed_batches(tmp_path, mode, codec):
    """Same seed -> the same batches, tensor for tensor, on every rank and epoch; later epochs come
    from the cache alone (the shards are deleted after epoch 0), and a mid-epoch start matches
    too; for a raw store and an fp8 one (the caches hold the stored rows)."""
    store = _store(Storage(str(tmp_path)), codec)
    for rank in (0, 1):
        streamed = _epochs(_reader(store, "none", rank))
        assert [len(e) for e in streamed] == [7, 7, 7]  # 20 clips per rank in batches of 3
        cached = _reader(store, mode, rank)
        first = list(cached.batches(0))
        assert _same(first, streamed[0])
        for name in store.storage.ls("shards"):
            if name.endswith(".parquet"):
                store.storage.fs.rm(store.storage.path("shards", name))
        assert _same(list(cached.batches(1)), streamed[1])
        assert _same(list(cached.batches(2)), streamed[2])
        store = _store(store.storage, codec)  # shards back
    resumed = _reader(store, mode, 0)
    assert _same(list(resumed.batches(0, start=4)),
                 _epochs(_reader(store, "none", 0), 1)[0][4:])
    assert _same(list(resumed.batches(1)), _epochs(_reader(store, "none", 0), 2)[1])


def test_batches_shuffle_per_epoch_and_cover_the_piece_once(store):
    reader = _reader(store, "none", 0)
    epochs = _epochs(reader)
    firsts = [torch.cat([b["student"][:, 0, 0] for b in e]) for e in epochs]
    # every clip once per epoch
    assert all(len(f) == 20 and len(set(f.tolist())) == 20 for f in firsts)
    assert set(firsts[0].tolist()) == set(firsts[1].tolist())
    assert not torch.equal(firsts[0], firsts[1])
    b = epochs[0][0]
    assert b["student"].dtype == torch.float32
    assert b["student"].shape == (3, STUDENT.tokens, STUDENT.dim)
    assert b["label_index"].dtype == torch.int64
    # the values are the stored fp16 values, exactly
    ref = {tuple(r["student"][0, 0, :4].tolist()): r
           for r in store.iter_torch(split="train", batch_size=1)}
    row = ref[tuple(b["student"][0, 0, :4].half().tolist())]
    assert torch.equal(b["student"][0], row["student"][0].float())
    assert torch.equal(b["timesformer"][0], row["timesformer"][0].float())
    assert b["label_index"][0] == row["label_index"][0]


def test_validation_order_is_the_store_order(store):
    reader = ClipReader(store, plan_blocks(store, "val"), NAMES, rank=0, world=1, batch_size=3,
                        device=torch.device("cpu"), shuffle=False)
    got = torch.cat([b["student"] for b in reader.batches(0)])
    want = torch.cat([b["student"] for b in store.iter_torch(split="val", batch_size=8)]).float()
    assert torch.equal(got, want)


def test_float32_store_decodes_to_the_stored_values(tmp_path):
    store = make_tiny_store(Storage(str(tmp_path)), dtype=np.float32)
    want = next(store.iter_torch(split="train", batch_size=24))["student"]
    reader = ClipReader(store, plan_blocks(store, "train"), NAMES, rank=0, world=1, batch_size=24,
                        device=torch.device("cpu"), shuffle=False)
    assert torch.equal(next(reader.batches(0))["student"], want)


def _host_decoded(store: FeatureStore, split: str) -> dict[str, torch.Tensor]:
    """The split's clips in plan order, decoded on the host by ``FeatureStore.to_torch``
    (float32)."""
    parts = []
    for b in plan_blocks(store, split):
        table = pq.ParquetFile(store.storage.path(b["path"])).read_row_group(b["rg"])
        parts.append(store.to_torch(table.take(b["rows"]), torch.float32))
    return {n: torch.cat([p[n] for p in parts]) for n in NAMES}


def test_fp8_store_streams_the_host_decode_within_the_codec_bound(tmp_path):
    """An fp8 store (ViViT's single token stays raw) through the reader: exactly the host decode of
    the same rows, and within fp8's stated bound of the fp16 values it encoded (a raw store of
    the same seed); its stored clip is about half the raw one."""
    fp8 = _store(Storage(str(tmp_path / "fp8")), "fp8")
    raw = _store(Storage(str(tmp_path / "raw")))
    assert {k: v["codec"] for k, v in fp8.layouts().items()} == {
        "student": "fp8", "videomae": "fp8", "timesformer": "fp8", "vivit": "raw"}
    assert 0.5 < clip_bytes(fp8.layouts()) / clip_bytes(raw.layouts()) < 0.6  # scales: 4 B/channel
    reader = ClipReader(fp8, plan_blocks(fp8, "train"), NAMES, rank=0, world=1, batch_size=7,
                        device=torch.device("cpu"), shuffle=False, window=7)
    got = {n: torch.cat([b[n] for b in reader.batches(0)]) for n in NAMES}
    host, values = _host_decoded(fp8, "train"), _host_decoded(raw, "train")
    for n in NAMES:
        assert got[n].dtype == torch.float32 and got[n].shape == (40, *values[n].shape[1:])
        assert torch.equal(got[n], host[n]), n
        x, err = values[n], (got[n] - values[n]).abs()
        if fp8.layouts()[n]["codec"] == "raw":
            assert torch.equal(got[n], x), n
            continue
        s_c = x.abs().amax(dim=1, keepdim=True) / 448  # per (clip, channel)
        assert bool((err <= 2**-4 * x.abs() + 2**-10 * s_c).all()), (n, float(err.max()))
        assert 0 < float(err.mean() / x.abs().mean()) < 2**-4  # coded, not passed through


def test_auto_cache_by_size():
    layouts = {"student": {"shape": [2048, 1024], "dtype": "float16"}}
    assert clip_bytes(layouts) == 2048 * 1024 * 2 + 4
    fp8 = {"student": {"shape": [2048, 1024], "dtype": "float16", "codec": "fp8"}}
    assert clip_bytes(fp8) == codecs.row_bytes(fp8["student"]) + 4 == 4 * 1024 + 2048 * 1024 + 4
    cpu = torch.device("cpu")
    assert resolve_cache("auto", 10, layouts, cpu) == "host"
    assert resolve_cache("auto", 10**9, layouts, cpu) == "none"
    assert resolve_cache("gpu", 10, layouts, cpu) == "device"
    assert resolve_cache("none", 10, layouts, cpu) == "none"


@pytest.mark.gpu
@pytest.mark.parametrize("codec", [None, "fp8"])
def test_device_cache_on_cuda_matches_streaming_on_cpu(tmp_path, codec):
    """Decoded on the GPU (fp8: codes x scales in float32) = decoded on the CPU, bit for bit."""
    store = _store(Storage(str(tmp_path)), codec)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on_gpu = ClipReader(store, plan_blocks(store, "train"), NAMES, rank=0, world=2, batch_size=3,
                        device=cuda, seed=5, window=7, cache="device")
    ref = _epochs(_reader(store, "none", 0), 2)
    for e in range(2):
        got = [{k: v.to(cpu) for k, v in b.items()} for b in on_gpu.batches(e)]
        assert _same(got, ref[e])


@pytest.mark.parametrize("codec", [None, "fp8"])
def test_direct_reads_yield_the_pyarrow_batches(tmp_path, codec):
    """Rows read straight from the shards into the reader's ring buffers (one preadv per run of
    rows) = the pyarrow path's batches, tensor for tensor, for every rank, epoch and a mid-epoch
    start, a shard that mixes splits included; a ring of one buffer gives the same."""
    store = _store(Storage(str(tmp_path)), codec)
    for rank in (0, 1):
        direct = _reader(store, "none", rank)
        assert direct.direct
        arrow = _reader(store, "none", rank, direct=False)
        assert _same(_flat(_epochs(direct)), _flat(_epochs(arrow)))
        assert _same(list(direct.batches(1, start=2)), list(arrow.batches(1, start=2)))
        one = _reader(store, "none", rank, ring_slots=1)
        assert _same(list(one.batches(0)), list(arrow.batches(0)))
    index = direct._index
    block = plan_blocks(store, "train")[0]
    pages = index.pages(store.storage.path(block["path"]), block["rg"])
    assert pages is not None and set(pages) == set(NAMES)


def test_shards_that_cannot_be_read_directly_go_through_pyarrow(tmp_path):
    """A shard rewritten with zstd (compressed pages) has no direct layout; the reader reads it with
    pyarrow and its batches stay those of the original store."""
    store = _store(Storage(str(tmp_path)))
    want = _epochs(_reader(store, "none", 0, direct=False), 2)
    path = store.storage.path(plan_blocks(store, "train")[0]["path"])
    table = pq.read_table(path)
    pq.write_table(table, path, compression="zstd", row_group_size=6)
    reader = _reader(store, "none", 0)
    assert reader.direct and reader._index.pages(path, 0) is None
    assert _same(_flat(_epochs(reader, 2)), _flat(want))


def test_direct_reads_check_each_row_length(tmp_path):
    """A row whose stored length is not the layout's width fails with an error naming it."""
    from pipeline.chunk_reads import read_rows
    store = _store(Storage(str(tmp_path)))
    block = plan_blocks(store, "train")[0]
    path = store.storage.path(block["path"])
    reader = _reader(store, "none", 0)
    pages = reader._index.pages(path, block["rg"])["student"]
    width = codecs.row_bytes(store.layouts()["student"])
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.empty((2, width), np.uint8)
        read_rows(fd, pages, np.array([0, 1]), out)
        r0, n, off = pages[0]
        shifted = [(r0, n, off + 4)]  # the lengths now fall inside the values
        with pytest.raises(ValueError, match=f"not {width}-byte values"):
            read_rows(fd, shifted, np.array([0, 1]), out)
    finally:
        os.close(fd)
