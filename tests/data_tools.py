"""Helpers that make test videos from the real sample files (used by tests/conftest.py).

Broken inputs are derived from real videos so each one fails for one known reason:

* ``truncated``: the first 100 kB of bikes.mp4; its ``moov`` atom sits at the end, so the
  container cannot be opened at all.
* ``truncated_midstream``: bikes.mp4 remuxed with ``+faststart`` (index first), cut in half:
  it opens and reports 250 frames, but the data ends mid-stream.
* ``corrupt_midstream``: the faststart remux with 20 kB of random bytes written over a
  third of the way in: it opens, then the decoder fails on a damaged packet.
* ``random_bytes``: 50 kB of random bytes named ``.mp4``; ``empty``: a 0-byte ``.mp4``;
  ``text``: a text file named ``.mp4``.
* ``audio_only``: a valid mp4 holding 1 s of silent AAC audio and no video stream (zero frames).
* ``too_short``: a valid h264 mp4 of 10 frames (272x640, 25 fps) -- shorter than any
  window of >= 6 frames at stride 2.

Valid videos in other codecs (same content as carphone_pristine.mp4, 120 frames 144x176):
``webm_vp9`` (VP9 in WebM), ``avi_mpeg4`` (MPEG-4 part 2 in AVI) and ``mpg_mpeg2`` (MPEG-2 video
in an MPEG program stream, ``.mpg``).

Not a video: ``m4a_audio``, 1 s of AAC audio in an ``.m4a`` (MP4) container.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

BROKEN = (
    "truncated",
    "truncated_midstream",
    "corrupt_midstream",
    "random_bytes",
    "empty",
    "text",
    "audio_only",
    "too_short",
)
VALID_OTHER_CODECS = ("webm_vp9", "avi_mpeg4", "mpg_mpeg2")
NOT_VIDEO = ("m4a_audio",)
TOO_SHORT_FRAMES = 10


def require_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError(
            "ffmpeg is not on PATH; the test videos derived from the samples need it "
            "(Debian/Ubuntu: apt-get install -y ffmpeg; CI installs it)"
        )
    return exe


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; raise with its stderr on failure."""
    cmd = [require_ffmpeg(), "-v", "error", "-nostdin", "-y", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(cmd)}):\n{proc.stderr}")


def make_test_videos(samples: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Write every broken and other-codec video under ``dest``; ``samples``: file name -> path."""
    dest.mkdir(parents=True, exist_ok=True)
    bikes, carphone = samples["bikes.mp4"], samples["carphone_pristine.mp4"]
    rng = random.Random(0)
    out: dict[str, Path] = {}

    out["truncated"] = dest / "truncated.mp4"
    out["truncated"].write_bytes(bikes.read_bytes()[:100_000])

    faststart = dest / "bikes_faststart.mp4"
    ffmpeg("-i", str(bikes), "-c", "copy", "-movflags", "+faststart", str(faststart))
    data = faststart.read_bytes()
    out["truncated_midstream"] = dest / "truncated_midstream.mp4"
    out["truncated_midstream"].write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    start = len(data) // 3
    damaged[start : start + 20_000] = rng.randbytes(20_000)
    out["corrupt_midstream"] = dest / "corrupt_midstream.mp4"
    out["corrupt_midstream"].write_bytes(bytes(damaged))
    faststart.unlink()

    out["random_bytes"] = dest / "random_bytes.mp4"
    out["random_bytes"].write_bytes(rng.randbytes(50_000))
    out["empty"] = dest / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["text"] = dest / "text.mp4"
    out["text"].write_text("this is a text file, not a video\n")

    out["audio_only"] = dest / "audio_only.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=8000:cl=mono",
        "-t",
        "1",
        "-c:a",
        "aac",
        str(out["audio_only"]),
    )
    out["too_short"] = dest / "too_short.mp4"
    ffmpeg(
        "-i",
        str(bikes),
        "-frames:v",
        str(TOO_SHORT_FRAMES),
        "-an",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(out["too_short"]),
    )
    out["webm_vp9"] = dest / "carphone_vp9.webm"
    ffmpeg(
        "-i",
        str(carphone),
        "-an",
        "-c:v",
        "libvpx-vp9",
        "-b:v",
        "300k",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        str(out["webm_vp9"]),
    )
    out["avi_mpeg4"] = dest / "carphone_mpeg4.avi"
    ffmpeg("-i", str(carphone), "-an", "-c:v", "mpeg4", "-q:v", "4", str(out["avi_mpeg4"]))
    out["mpg_mpeg2"] = dest / "carphone_mpeg2.mpg"
    ffmpeg(
        "-i",
        str(carphone),
        "-an",
        "-c:v",
        "mpeg2video",
        "-q:v",
        "4",
        "-f",
        "mpeg",
        str(out["mpg_mpeg2"]),
    )
    out["m4a_audio"] = dest / "tone.m4a"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=8000",
        "-t",
        "1",
        "-c:a",
        "aac",
        str(out["m4a_audio"]),
    )
    return out
