"""Listing accounts for every file under the source: a candidate video, a failed one with its
reason, or skipped with a reason; through the CLI's extract stage on real videos."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.config import VIDEO_EXTENSIONS, SourcesConfig
from pipeline.featurestore import FeatureStore
from pipeline.sources import BEYOND_LIMIT, DIR_LINK, HIDDEN, NOT_VIDEO, list_sources, video_id
from pipeline.storage import Storage

SMOKE = "jobs/smoke.yaml"


def _all_files(root: Path) -> set[str]:
    """Every non-directory entry under ``root`` (files, symlinks of any kind, pipes), relative."""
    out = set()
    for d, dirs, files in os.walk(root):  # symlinked directories show up in dirs, not followed
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            out.add(os.path.relpath(os.path.join(d, name), root))
    return out


def _tree(root: Path) -> None:
    """Listing reads names and file types only: empty files stand in for videos here."""
    (root / "a").mkdir(parents=True)
    for name in ("a/v.mp4", "a/notes.txt", "a/song.m4a", "a/.partial.mp4", ".DS_Store", "top.MPG",
                 "a/sub.srt"):
        (root / name).write_bytes(b"")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("x")
    os.symlink("/nonexistent/gone.mp4", root / "a" / "gone.mp4")
    os.symlink("/nonexistent/gone.txt", root / "a" / "gone.txt")
    os.symlink(root / "a" / "v.mp4", root / "a" / "alias.mp4")  # a good link is a video
    os.symlink(root / "a", root / "linked")
    os.mkfifo(root / "a" / "pipe.mp4")


def test_default_extensions_list_every_common_container(tmp_path):
    for ext in VIDEO_EXTENSIONS:
        (tmp_path / f"clip.{ext}").write_bytes(b"")
        (tmp_path / f"UP.{ext.upper()}").write_bytes(b"")
    listing = list_sources(SourcesConfig(uri=str(tmp_path)))
    assert len(listing.records) == 2 * len(VIDEO_EXTENSIONS)
    assert listing.summary() == {} and listing.report() == []


def test_every_file_is_a_video_a_failure_or_skipped_with_a_reason(tmp_path):
    _tree(tmp_path)
    listing = list_sources(SourcesConfig(uri=str(tmp_path)))
    recs = {os.path.relpath(r["path"], tmp_path): r for r in listing.records}
    assert sorted(recs) == ["a/alias.mp4", "a/gone.mp4", "a/pipe.mp4", "a/v.mp4", "top.MPG"]
    assert recs["a/gone.mp4"]["error"] == "broken symlink (-> /nonexistent/gone.mp4)"
    assert recs["a/pipe.mp4"]["error"] == "not a regular file (named pipe)"
    assert "error" not in recs["a/v.mp4"] and "error" not in recs["a/alias.mp4"]
    assert recs["a/gone.mp4"]["video_id"] == video_id(str(tmp_path / "a" / "gone.mp4"))
    assert listing.skipped == {
        HIDDEN: [".DS_Store", ".git/config", "a/.partial.mp4"],
        NOT_VIDEO: ["a/gone.txt", "a/notes.txt", "a/song.m4a", "a/sub.srt"],
        DIR_LINK: ["linked"]}
    skipped = [p for paths in listing.skipped.values() for p in paths]
    assert sorted([*recs, *skipped]) == sorted(_all_files(tmp_path))  # nothing unaccounted
    assert listing.report() == [
        "3 files skipped: hidden (.DS_Store, .git/config, a/.partial.mp4)",
        "4 files skipped: not a video extension (a/gone.txt, a/notes.txt, a/song.m4a, a/sub.srt)",
        "1 file skipped: symlink to a directory (not followed) (linked)"]
    assert listing.summary(first=2)[NOT_VIDEO] == {"count": 4,
                                                   "first": ["a/gone.txt", "a/notes.txt"]}
    assert listing.report(first=2)[1] == ("4 files skipped: not a video extension "
                                          "(a/gone.txt, a/notes.txt, ...)")


def test_extensions_all_makes_every_visible_file_a_candidate(tmp_path):
    _tree(tmp_path)
    listing = list_sources(SourcesConfig(uri=str(tmp_path), extensions="all"))
    recs = {os.path.relpath(r["path"], tmp_path): r.get("error") for r in listing.records}
    assert recs == {"a/alias.mp4": None, "a/gone.mp4": "broken symlink (-> /nonexistent/gone.mp4)",
                    "a/gone.txt": "broken symlink (-> /nonexistent/gone.txt)", "a/notes.txt": None,
                    "a/pipe.mp4": "not a regular file (named pipe)", "a/song.m4a": None,
                    "a/sub.srt": None, "a/v.mp4": None, "top.MPG": None}
    assert listing.skipped[NOT_VIDEO] == [] and len(listing.skipped[HIDDEN]) == 3


def test_limit_reports_the_rest(tmp_path):
    for i in range(5):
        (tmp_path / f"v{i}.mp4").write_bytes(b"")
    listing = list_sources(SourcesConfig(uri=str(tmp_path), limit=2))
    assert [Path(r["path"]).name for r in listing.records] == ["v0.mp4", "v1.mp4"]
    assert [Path(p).name for p in listing.skipped[BEYOND_LIMIT]] == ["v2.mp4", "v3.mp4", "v4.mp4"]


def test_nothing_to_list_says_what_was_skipped(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no videos with extensions .* \(1 file skipped: hidden "
                                         r"\(.hidden.mp4\); 1 file skipped: not a video extension "
                                         r"\(notes.txt\)\)"):
        list_sources(SourcesConfig(uri=str(tmp_path)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_failed_video(tmp_path):
    (tmp_path / "locked.mp4").write_bytes(b"x")
    (tmp_path / "locked.mp4").chmod(0)
    (rec,) = list_sources(SourcesConfig(uri=str(tmp_path))).records
    assert rec["error"] == "unreadable: permission denied"


@pytest.mark.integration
def test_s3_prefix_counts_hidden_and_other_files(s3_server):
    bucket = s3_server.make_bucket("listing")
    fs = s3_server.fs()
    for key in ("v/a/x.mp4", "v/a/y.mkv", "v/a/notes.txt", "v/.staging/z.mp4", "v/b/clip.mpg"):
        fs.pipe(f"{bucket}/{key}", b"")
    listing = list_sources(SourcesConfig(uri=f"s3://{bucket}/v"),
                           storage_options=s3_server.storage_options)
    assert [r["path"] for r in listing.records] == [f"s3://{bucket}/v/{k}" for k in
                                                    ("a/x.mp4", "a/y.mkv", "b/clip.mpg")]
    assert listing.summary() == {HIDDEN: {"count": 1, "first": [".staging/z.mp4"]},
                                 NOT_VIDEO: {"count": 1, "first": ["a/notes.txt"]}}


# ----------------------------------------------------------- the CLI's extract stage (Ray)

@pytest.mark.integration
def test_cli_extract_accounts_for_every_file(ray_cluster, tmp_path, sample_files, bad_videos,
                                             capsys):
    """Real videos (mp4, an MPEG-2 .mpg, AVI), broken ones, an .m4a, a text file, hidden files, a
    broken symlink: every file is processed, failed with its reason, or reported as skipped; then
    ``sources.extensions=all`` hands the other files to decode, which fails them with reasons."""
    src = tmp_path / "videos"
    (src / "phone").mkdir(parents=True)
    (src / "bad").mkdir()
    shutil.copy(sample_files["carphone_pristine.mp4"], src / "phone" / "carphone.mp4")
    shutil.copy(bad_videos["mpg_mpeg2"], src / "phone" / "carphone_mpeg2.mpg")
    shutil.copy(bad_videos["avi_mpeg4"], src / "phone" / "carphone_mpeg4.avi")
    for name in ("truncated", "text", "audio_only"):
        shutil.copy(bad_videos[name], src / "bad" / f"{name}.mp4")
    shutil.copy(bad_videos["m4a_audio"], src / "bad" / "tone.m4a")
    (src / "bad" / "notes.txt").write_text("not a video\n")
    (src / ".DS_Store").write_bytes(b"\0")
    (src / "phone" / ".carphone.mp4.part").write_bytes(b"\0")
    os.symlink(tmp_path / "moved-away.mp4", src / "bad" / "broken.mp4")
    storage = Storage(str(tmp_path / "out"))
    args = ["run", SMOKE, "--stages", "extract", f"storage.url={storage.root_url}",
            f"sources.uri={src}", "decode.clips_per_video=1", "decode.short_side=128"]

    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("[extract] 2 files skipped: hidden (.DS_Store, phone/.carphone.mp4.part)" in out)
    assert "[extract] 2 files skipped: not a video extension (bad/notes.txt, bad/tone.m4a)" in out
    store = FeatureStore(storage, "features")
    by_path = {str(src / rel): rel for rel in _all_files(src)}
    done = {vid for vid, clips in store.done_clips().items() if clips == {0}}
    failed = {r["video_id"]: r["reason"] for r in store.failed().values()}
    processed = {by_path[p] for p in by_path if video_id(p) in done}
    reasons = {by_path[p]: failed[video_id(p)] for p in by_path if video_id(p) in failed}
    assert processed == {"phone/carphone.mp4", "phone/carphone_mpeg2.mpg",
                         "phone/carphone_mpeg4.avi"}
    assert reasons == {
        "bad/broken.mp4": f"broken symlink (-> {tmp_path / 'moved-away.mp4'})",
        "bad/truncated.mp4": "cannot open: not a video, unsupported or truncated container",
        "bad/text.mp4": "cannot open: not a video, unsupported or truncated container",
        "bad/audio_only.mp4": "no video stream (zero frames)"}
    summary = json.loads(storage.read_bytes("runs/smoke/summary.json"))["stages"]["extract"]
    assert summary["skipped_files"] == {
        HIDDEN: {"count": 2, "first": [".DS_Store", "phone/.carphone.mp4.part"]},
        NOT_VIDEO: {"count": 2, "first": ["bad/notes.txt", "bad/tone.m4a"]}}
    skipped = sum(v["count"] for v in summary["skipped_files"].values())
    assert (summary["processed"], summary["failed"], summary["listed"]) == (3, 4, 7)
    assert summary["invariant_ok"] and summary["listed"] + skipped == len(by_path) == 11

    # extensions: all -> the .m4a and the text file are candidates: decode fails them, with reasons
    assert main([*args, "sources.extensions=all"]) == 0
    out = capsys.readouterr().out
    assert "not a video extension" not in out and "2 files skipped: hidden" in out
    failed = {r["video_id"]: r["reason"] for r in store.failed().values()}
    assert failed[video_id(str(src / "bad" / "tone.m4a"))] == "no video stream (zero frames)"
    # ffmpeg opens a short text file as a "tty" video; decord then fails on its first frame
    assert re.match(r"(cannot open|corrupt or truncated stream while opening)",
                    failed[video_id(str(src / "bad" / "notes.txt"))])
    summary = json.loads(storage.read_bytes("runs/smoke/summary.json"))["stages"]["extract"]
    assert (summary["processed"], summary["failed"], summary["listed"]) == (3, 6, 9)
    assert summary["videos_this_run"] == 2 and summary["clips"] == 0 and summary["invariant_ok"]
