"""Decoding real videos: clip placement, size, crop geometry, failures, short-video policies, the
Ray fn."""
from __future__ import annotations

import decord
import numpy as np
import pytest
import torch
from data_tools import BROKEN, TOO_SHORT_FRAMES

from pipeline.config import DecodeConfig
from pipeline.decode import (
    VideoError,
    _frames,
    clip_frame_indices,
    decode_clips,
    make_decode_fn,
    resize_center_crop,
)
from pipeline.samples import SAMPLE_FRAMES

SMALL = DecodeConfig(window=8, stride=2, clips_per_video=2, short_side=64)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- indices and geometry

def test_clip_indices_spread_evenly_with_stride():
    cfg = DecodeConfig(window=32, stride=2, clips_per_video=2)
    idx = clip_frame_indices(250, cfg)  # bikes.mp4: span 63, 187 free frames
    assert idx.shape == (2, 32)
    assert idx[:, 0].tolist() == [47, 140] and idx[:, -1].tolist() == [109, 202]
    assert (np.diff(idx, axis=1) == 2).all()
    one = clip_frame_indices(100, DecodeConfig(window=4, stride=3, clips_per_video=1))
    assert one.tolist() == [[45, 48, 51, 54]]  # centred: (100 - 10) / 2 = 45
    exact = clip_frame_indices(63, cfg)  # exactly one span: every clip is the whole video
    assert exact.tolist() == [list(range(0, 63, 2))] * 2


def test_short_video_policies_on_indices():
    base = {"window": 4, "stride": 3, "clips_per_video": 2}
    with pytest.raises(VideoError, match=r"too short: 7 frames < needed 10"):
        clip_frame_indices(7, DecodeConfig(**base))
    pad, loop = (DecodeConfig(**base, short_video=p) for p in ("pad", "loop"))
    assert clip_frame_indices(7, pad).tolist() == [[0, 3, 6, 6]] * 2
    assert clip_frame_indices(7, loop).tolist() == [[0, 3, 6, 2], [3, 6, 2, 5]]
    with pytest.raises(VideoError, match="zero frames"):
        clip_frame_indices(0, DecodeConfig(**base, short_video="loop"))


def test_resize_center_crop_keeps_the_centre():
    # value = source column index / 2, so the crop's middle column shows where it came from
    cols = (np.arange(200) // 2).astype(np.uint8)
    frames = np.broadcast_to(cols[None, None, :, None], (2, 100, 200, 3)).copy()
    out = resize_center_crop(frames, 50)
    assert out.shape == (2, 50, 50, 3) and out.dtype == np.uint8
    # 100x200 -> 50x100, crop columns 25..75 of the resized = source columns 50..150
    assert abs(int(out[0, 0, 0, 0]) - 25) <= 1 and abs(int(out[0, 0, -1, 0]) - 74) <= 1
    tall = resize_center_crop(np.zeros((1, 90, 30, 3), np.uint8), 30)  # already at size: crop only
    assert tall.shape == (1, 30, 30, 3)


# ---------------------------------------------------------------- real sample videos

@pytest.mark.parametrize("name", sorted(SAMPLE_FRAMES))
def test_default_clips_from_each_sample(sample_files, name):
    cfg = DecodeConfig()  # 32 frames, stride 2, short side 256, 2 clips
    clips = decode_clips(str(sample_files[name]), cfg)
    assert [ci for ci, _ in clips] == [0, 1]
    for _, frames in clips:
        assert frames.shape == (32, 256, 256, 3) and frames.dtype == np.uint8
        assert frames.flags.c_contiguous
        assert frames.std() > 5  # real picture content, not a blank buffer
    assert _mad(clips[0][1], clips[1][1]) > 1  # two different places in the video


def test_clips_match_a_direct_full_size_decode(sample_files):
    """Right frames, right crop: compare with decord at full size + the torch resize/crop."""
    path = str(sample_files["bikes.mp4"])
    cfg = DecodeConfig(window=6, stride=5, clips_per_video=3, short_side=96)
    clips = decode_clips(path, cfg)
    vr = decord.VideoReader(path, num_threads=1)
    idx = clip_frame_indices(len(vr), cfg)
    for ci, frames in clips:
        ref = resize_center_crop(vr.get_batch(idx[ci].tolist()).asnumpy(), cfg.short_side)
        assert _mad(frames, ref) < 4  # different resamplers, same pixels
        # a window shifted by one stride is clearly further away
        shifted = resize_center_crop(vr.get_batch((idx[ci] + cfg.stride).tolist()).asnumpy(),
                                     cfg.short_side)
        assert _mad(frames, shifted) > _mad(frames, ref) + 1


def test_decoded_frames_are_taken_without_a_copy(sample_files):
    """decord's batch becomes a torch tensor on the same memory (DLPack) with asnumpy()'s values,
    and it stays valid after the reader and the batch are gone; resize_center_crop gives the same
    clip from either."""
    vr = decord.VideoReader(str(sample_files["bikes.mp4"]), num_threads=1)
    batch = vr.get_batch([0, 2, 4])
    want = batch.asnumpy()
    got = _frames(batch)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert got.data_ptr() == _frames(batch).data_ptr()  # one buffer, not copies
    del batch, vr
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(resize_center_crop(got, 64), resize_center_crop(want, 64))


def test_resize_in_decord_or_torch_give_the_same_picture(sample_files):
    """Both resize paths (decord's swscale at a second open, torch after a source-size decode) and
    any decode chunking give the same clips: chunking bit-identically, the two resamplers within a
    few levels."""
    path = str(sample_files["bikes.mp4"])  # 640x272
    torch_path = DecodeConfig(window=6, stride=3, clips_per_video=3, short_side=96,
                              decoder_resize_ratio=100)
    decord_path = torch_path.model_copy(update={"decoder_resize_ratio": 1.0})
    chunked = torch_path.model_copy(update={"decode_chunk": 4})  # 18 frames in 5 chunks
    ref = decode_clips(path, torch_path)
    others = decode_clips(path, decord_path), decode_clips(path, chunked)
    for (ci, a), (_, b), (_, c) in zip(ref, *others, strict=True):
        assert a.shape == b.shape == (6, 96, 96, 3)
        assert _mad(a, b) < 4
        np.testing.assert_array_equal(a, c)


def test_clip_indices_select_clips(sample_files):
    path = str(sample_files["carphone_pristine.mp4"])
    everything = dict(decode_clips(path, SMALL))
    only = decode_clips(path, SMALL, clip_indices=np.array([1]))
    assert [ci for ci, _ in only] == [1]
    np.testing.assert_array_equal(only[0][1], everything[1])
    assert decode_clips(path, SMALL, clip_indices=[]) == []
    with pytest.raises(ValueError, match=r"clip_indices \[2\] outside 0..1"):
        decode_clips(path, SMALL, clip_indices=[0, 2])


@pytest.mark.parametrize("name", ["webm_vp9", "avi_mpeg4"])
def test_other_codecs_decode_to_the_same_picture(bad_videos, sample_files, name):
    clips = decode_clips(str(bad_videos[name]), SMALL)
    ref = decode_clips(str(sample_files["carphone_pristine.mp4"]), SMALL)
    for (ci, frames), (_, ref_frames) in zip(clips, ref, strict=True):
        assert frames.shape == (8, 64, 64, 3)
        assert _mad(frames, ref_frames) < 8  # same source, lossy re-encode


# ---------------------------------------------------------------- failures

EXPECTED_REASON = {
    "truncated": "cannot open: not a video, unsupported or truncated container",
    "truncated_midstream": "corrupt or truncated stream while opening",
    "corrupt_midstream": r"corrupt or truncated stream while decoding frames \d+\.\.\d+ of 250",
    "random_bytes": "cannot open: not a video",
    "empty": r"empty file \(0 bytes\)",
    "text": "cannot open: not a video",
    "audio_only": r"no video stream \(zero frames\)",
    "too_short": rf"too short: {TOO_SHORT_FRAMES} frames < needed 63",
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_videos_raise_video_error_with_reason(bad_videos, name):
    path = str(bad_videos[name])
    with pytest.raises(VideoError) as err:
        decode_clips(path, DecodeConfig(clips_per_video=2))
    assert err.value.path == path and path in str(err.value)
    assert __import__("re").search(EXPECTED_REASON[name], err.value.reason), err.value.reason


def test_video_error_pickles_with_reason_and_path():
    import pickle
    err = pickle.loads(pickle.dumps(VideoError("too short: 3 frames < needed 63", "s3://b/v.mp4")))
    assert (err.reason, err.path, str(err)) == ("too short: 3 frames < needed 63", "s3://b/v.mp4",
                                                "s3://b/v.mp4: too short: 3 frames < needed 63")


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="file not found"):
        decode_clips(str(tmp_path / "gone.mp4"), SMALL)


def test_short_video_pad_and_loop_on_a_real_video(bad_videos):
    path = str(bad_videos["too_short"])  # 10 frames; window 8 x stride 2 needs 15
    vr = decord.VideoReader(path, num_threads=1)
    native = vr.get_batch(list(range(TOO_SHORT_FRAMES))).asnumpy()
    ref = resize_center_crop(native, 64)
    with pytest.raises(VideoError, match="too short: 10 frames < needed 15"):
        decode_clips(path, SMALL)
    pad = decode_clips(path, SMALL.model_copy(update={"short_video": "pad"}))
    assert len(pad) == 2
    frames = pad[0][1]  # source frames 0,2,4,6,8,9,9,9
    assert _mad(frames[4], ref[8]) < 4 and _mad(frames[5], ref[9]) < 4
    np.testing.assert_array_equal(frames[5], frames[7])
    loop = decode_clips(path, SMALL.model_copy(update={"short_video": "loop"}))
    first, second = loop[0][1], loop[1][1]  # 0,2,4,6,8,0,2,4 and 5,7,9,1,3,5,7,9
    np.testing.assert_array_equal(first[5], first[0])
    assert _mad(first[0], ref[0]) < 4 and _mad(second[0], ref[5]) < 4
    assert _mad(first[0], second[0]) > 1


# ---------------------------------------------------------------- the Ray Data fn, on a plain dict

def _batch(records: list[dict]) -> dict[str, np.ndarray]:
    out = {k: np.array([r[k] for r in records])
           for k in ("video_id", "path", "label_index", "split")}
    if any("clip_indices" in r for r in records):
        out["clip_indices"] = np.array([r.get("clip_indices") for r in records], dtype=object)
    return out


def test_decode_fn_counts_rows_and_failures(sample_files, bad_videos):
    failures: list[tuple[dict, str]] = []
    fn = make_decode_fn(SMALL, record_failure=lambda rec, reason: failures.append((rec, reason)))
    records = [
        {"video_id": "good0", "path": str(sample_files["bikes.mp4"]), "label_index": 2,
         "split": "train"},
        {"video_id": "bad0", "path": str(bad_videos["text"]), "label_index": 0, "split": "val"},
        {"video_id": "good1", "path": str(sample_files["carphone_distorted.mp4"]), "label_index": 1,
         "split": "val", "clip_indices": [1]},
        {"video_id": "bad1", "path": str(bad_videos["too_short"]), "label_index": 1,
         "split": "train"},
        {"video_id": "good2", "path": str(sample_files["carphone_pristine.mp4"]), "label_index": 1,
         "split": "train", "clip_indices": None},
    ]
    out = fn(_batch(records))
    assert sorted(out) == ["clip_index", "frames", "label_index", "split", "video_id"]
    assert out["video_id"].tolist() == ["good0", "good0", "good1", "good2", "good2"]
    assert out["clip_index"].tolist() == [0, 1, 1, 0, 1]
    assert out["label_index"].tolist() == [2, 2, 1, 1, 1] and out["label_index"].dtype == np.int64
    assert out["split"].tolist() == ["train", "train", "val", "train", "train"]
    assert out["frames"].shape == (5, 8, 64, 64, 3) and out["frames"].dtype == np.uint8
    assert [(rec["video_id"], type(rec["label_index"])) for rec, _ in failures] == [
        ("bad0", int), ("bad1", int)]
    assert "cannot open" in failures[0][1] and "too short" in failures[1][1]
    # every record is accounted for: videos with rows + failed videos == records in
    assert len(set(out["video_id"].tolist())) + len(failures) == len(records)
    np.testing.assert_array_equal(out["frames"][2],
                                  dict(decode_clips(records[2]["path"], SMALL))[1])


def test_decode_fn_all_failed_gives_typed_empty_batch(bad_videos):
    reasons = []
    fn = make_decode_fn(SMALL, record_failure=lambda rec, reason: reasons.append(reason))
    out = fn(_batch([{"video_id": "x", "path": str(bad_videos["empty"]), "label_index": -1,
                      "split": "val"}]))
    assert out["frames"].shape == (0, 8, 64, 64, 3) and out["frames"].dtype == np.uint8
    assert out["clip_index"].dtype == np.int64 and len(out["video_id"]) == 0
    assert reasons == ["empty file (0 bytes)"]


# ---------------------------------------------------------------- S3

@pytest.mark.integration
def test_decode_from_s3_matches_local(s3_server, sample_files):
    bucket = s3_server.make_bucket("decode")
    fs = s3_server.fs()
    fs.put_file(str(sample_files["bikes.mp4"]), f"{bucket}/v/bikes.mp4")
    url = f"s3://{bucket}/v/bikes.mp4"
    remote = decode_clips(url, SMALL, storage_options=s3_server.storage_options)
    local = decode_clips(str(sample_files["bikes.mp4"]), SMALL)
    for (ci, a), (cj, b) in zip(remote, local, strict=True):
        assert ci == cj
        np.testing.assert_array_equal(a, b)
    with pytest.raises(VideoError, match="file not found"):
        decode_clips(f"s3://{bucket}/v/missing.mp4", SMALL,
                     storage_options=s3_server.storage_options)
    failures = []
    fn = make_decode_fn(SMALL, record_failure=lambda r, why: failures.append(why),
                        storage_options=s3_server.storage_options)
    out = fn(_batch([{"video_id": "s", "path": url, "label_index": 0, "split": "train"}]))
    assert out["frames"].shape == (2, 8, 64, 64, 3) and failures == []
