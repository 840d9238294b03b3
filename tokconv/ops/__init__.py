"""Low-level ops with a fused kernel and a pure-torch reference side by side."""
from .selective_scan import (
                             HAS_FUSED,
                             backend,
                             selective_scan_fn,
                             selective_scan_naive,
                             selective_scan_ref,
                             use_backend,
)
from .ssd import HAS_FUSED_SSD, ssd_scan_fn, ssd_scan_naive, ssd_scan_ref

__all__ = ["HAS_FUSED", "HAS_FUSED_SSD", "backend", "selective_scan_fn", "selective_scan_naive",
           "selective_scan_ref", "ssd_scan_fn", "ssd_scan_naive", "ssd_scan_ref", "use_backend"]
