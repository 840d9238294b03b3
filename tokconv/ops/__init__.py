"""Low-level ops with a fused kernel and a pure-torch reference side by side."""
from .selective_scan import (
                             HAS_FUSED,
                             backend,
                             selective_scan_fn,
                             selective_scan_naive,
                             selective_scan_ref,
                             use_backend,
)

__all__ = ["HAS_FUSED", "backend", "selective_scan_fn", "selective_scan_naive", "selective_scan_ref",
           "use_backend"]
