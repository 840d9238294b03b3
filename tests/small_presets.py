"""Converter presets for fits on real tiny feature pairs (tests/tokconv/test_overfit.py,
tests/pipeline/test_train_loop.py): one preset per design, narrower trunks, half grids."""
from __future__ import annotations

from tokconv import list_converters

# narrower trunks keep each fit to seconds on CPU (unknown designs keep their preset widths)
SMALL = {"perceiver": {"n_lat": 64, "d_lat": 128, "d_dec": 128, "heads": 4, "dec_heads": 4},
         "convmix": {"dim": 128, "hidden": 256, "out_hidden": 256},
         "tokenlearner": {"dim": 128, "num_tokens": 64, "select_hidden": 128, "heads": 4},
         "ssm": {"dim": 128, "headdim": 32}}
# the tiny backbones' full grids resampled in 3D to half size per axis (ViViT: one token)
HALF = {"student": (4, 8, 8), "videomae": (4, 7, 7), "timesformer": (8, 7, 7), "vivit": None}


def one_preset_per_design() -> list[str]:
    """The smallest preset of every design (the name's first part), sorted."""
    by_design: dict[str, list[str]] = {}
    for name in list_converters():
        by_design.setdefault(name.split("_")[0], []).append(name)
    return sorted(next((n for n in names if n.endswith("_small")), names[0])
                  for names in by_design.values())


def small_kwargs(preset: str) -> dict:
    """``SMALL``'s keywords for ``preset``'s design ({} for the others)."""
    return SMALL.get(preset.split("_")[0], {})
