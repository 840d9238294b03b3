"""Feature-store codecs: how one clip's (N, D) feature tensor is stored as a row of bytes.

A registry by name (timm ``_registry`` habit): ``CODECS[name]`` is a ``Codec`` with ``encode``
(B, N, D) float -> (B, W) uint8 rows and ``decode`` (B, W) uint8 rows -> (B, N, D), both plain
torch on any device: the training reader (``pipeline.train_data``) decodes ON THE DEVICE; host
decoding (``FeatureStore.to_torch``) is for evaluation and CPU paths.

=====  ==============================================  ===========================================
codec  row of one clip (N tokens, D channels)          error bound per element, x the input value
=====  ==============================================  ===========================================
raw    N*D values in the layout's dtype (fp16 by       0 (bit-exact: the store before codecs)
       default), W = N*D*itemsize
fp8    D float32 scales s_c = absmax_c / 448 over the  |x^ - x| <= 2^-4 |x| + 2^-10 s_c (e4m3: 3
       clip's tokens, then N*D float8 e4m3fn codes     mantissa bits, subnormal below 2^-6 s_c),
       round(x / s_c), W = 4*D + N*D                   then rounding to the output dtype
int8   D float32 scales s_c = absmax_c / 127, then     |x^ - x| <= s_c / 2, then rounding to the
       N*D int8 codes round(x / s_c), W = 4*D + N*D    output dtype
fp8z   fp8's row, its Parquet column chunks zstd-      fp8's (the compression is lossless)
       compressed (``compression``): W as fp8's, the
       file smaller by the codes' entropy
=====  ==============================================  ===========================================

``Codec.compression`` is the Parquet compression of the column's chunks: the writer
(``FeatureStore.write_shard``) applies it per column (``parquet_compression``), pyarrow's readers
undo it on their threads (the training reader's direct preadv path then uses pyarrow for those row
groups), so decoding sees the same rows. Bytes per clip and speeds: bench/RESULTS.md (Codecs).

Scales are per (clip, channel), over the clip's tokens: channels of one model differ by orders of
magnitude, tokens of one channel much less (measured on real feature pairs: bench/RESULTS.md).
A zero channel decodes to exact zeros (its scale is the smallest normal float32); non-finite input
is refused (it would poison every value of its channel).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from pipeline.dtypes import TORCH_DTYPES

DEFAULT = "raw"
_SCALE_BYTES = 4  # float32 per channel
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Codec:
    """``encode(x (B, N, D)) -> uint8 (B, row_bytes)``; ``decode(raw (B, row_bytes) uint8, shape,
    dtype, out_dtype) -> (B, N, D) out_dtype`` on raw's device. ``dtype``: the values' dtype before
    encoding (the layout's); ``bound``: the stated error bound."""
    name: str
    bound: str
    row_bytes: Callable[[tuple[int, int], str], int]
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, tuple[int, int], str, torch.dtype], torch.Tensor]
    scaled: bool = False  # stores a scale per (clip, channel): pointless for single-token columns
    compression: str = "none"  # Parquet compression of the column chunks (a pyarrow codec name)


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is already registered")
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str, where: str = "") -> Codec:
    """The registered codec ``name``; a ValueError naming it and the known ones otherwise."""
    if name not in CODECS:
        raise ValueError(f"{where}unknown feature codec {name!r}; known codecs: "
                         f"{', '.join(CODECS)}")
    return CODECS[name]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------- raw

def _raw_row_bytes(shape: tuple[int, int], dtype: str) -> int:
    return shape[0] * shape[1] * TORCH_DTYPES[dtype].itemsize


def _raw_encode(x: torch.Tensor) -> torch.Tensor:
    return _rows(x.contiguous().view(torch.uint8)) if x.dtype != torch.uint8 else _rows(x)


def _raw_decode(raw: torch.Tensor, shape, dtype: str, out_dtype: torch.dtype) -> torch.Tensor:
    if raw.dtype == torch.uint8:  # stored rows; a tensor already in the layout's dtype passes as is
        raw = raw.contiguous().view(TORCH_DTYPES[dtype])
    return raw.reshape(raw.shape[0], *shape).to(out_dtype)


register_codec(Codec("raw", "exact", _raw_row_bytes, _raw_encode, _raw_decode))


# ---------------------------------------------------------------------------- scaled 8-bit codes

def _scaled_row_bytes(shape: tuple[int, int], dtype: str) -> int:
    return _SCALE_BYTES * shape[1] + shape[0] * shape[1]


def _scaled_encode(x: torch.Tensor, code_dtype: torch.dtype, qmax: float, rounding) -> torch.Tensor:
    """(B, N, D) -> (B, 4*D + N*D) uint8: per-(clip, channel) float32 scales, then the codes."""
    if x.dim() != 3:
        raise ValueError(f"codec encode: expected (B, N, D) features, got shape {tuple(x.shape)}")
    # absmax in the input dtype (exact); NaN and Inf reach it: checking the (B, D) scales suffices.
    # A tensor divisor: CUDA divides by a Python scalar through its reciprocal (1 ulp off the
    # host's scales); tensor by tensor is correctly rounded on both, so every device writes the
    # same bytes
    absmax = x.abs().amax(dim=1).float()
    scale = torch.div(absmax, torch.full_like(absmax, qmax)).clamp_min_(_TINY)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("codec encode: non-finite values (NaN/Inf) in the features: a scale would "
                         "spread them over the whole channel")
    # |x| <= absmax, so |x / scale| <= qmax up to rounding, which the cast rounds back to qmax;
    # the floor at the smallest normal float32 keeps x / scale finite (a zero channel: codes 0)
    codes = rounding(torch.div(x, scale.unsqueeze(1))).to(code_dtype)
    return torch.cat([_rows(scale.view(torch.uint8)), _rows(codes.view(torch.uint8))], 1)


def _scaled_decode(raw: torch.Tensor, shape, dtype: str, out_dtype: torch.dtype,
                   code_dtype: torch.dtype) -> torch.Tensor:
    """(B, 4*D + N*D) uint8 -> (B, N, D) out_dtype, computed in float32 on raw's device."""
    n, d = shape
    b = raw.shape[0]
    if raw.dtype != torch.uint8 or raw.shape[1:] != (_SCALE_BYTES * d + n * d,):
        raise ValueError(f"codec decode: expected uint8 rows of {_SCALE_BYTES * d + n * d} bytes "
                         f"for shape {tuple(shape)}, got {raw.dtype} {tuple(raw.shape)}")
    scale = raw[:, :_SCALE_BYTES * d].contiguous().view(torch.float32)  # (B, D): a small copy
    codes = raw[:, _SCALE_BYTES * d:].view(code_dtype).reshape(b, n, d)
    return (codes.float() * scale.unsqueeze(1)).to(out_dtype)


def _fp8_encode(x: torch.Tensor) -> torch.Tensor:
    # the cast rounds to nearest even (e4m3fn: NaN only from 464 up, far above qmax's rounding)
    return _scaled_encode(x, torch.float8_e4m3fn, 448.0, lambda y: y)


def _fp8_decode(raw, shape, dtype, out_dtype):
    return _scaled_decode(raw, shape, dtype, out_dtype, torch.float8_e4m3fn)


def _int8_encode(x: torch.Tensor) -> torch.Tensor:
    return _scaled_encode(x, torch.int8, 127.0, torch.round_)


def _int8_decode(raw, shape, dtype, out_dtype):
    return _scaled_decode(raw, shape, dtype, out_dtype, torch.int8)


register_codec(Codec("fp8", "|x^ - x| <= 2^-4 |x| + 2^-10 s_c, s_c = absmax_c / 448",
                     _scaled_row_bytes, _fp8_encode, _fp8_decode, scaled=True))
register_codec(Codec("int8", "|x^ - x| <= s_c / 2, s_c = absmax_c / 127",
                     _scaled_row_bytes, _int8_encode, _int8_decode, scaled=True))
# fp8's rows, zstd-compressed by Parquet: e4m3 codes of one channel use few of the 256 byte values
# unevenly (lossless: the entropy coder's gain, no match finding needed)
register_codec(Codec("fp8z", CODECS["fp8"].bound, _scaled_row_bytes, _fp8_encode, _fp8_decode,
                     scaled=True, compression="zstd"))


# ---------------------------------------------------------------------------- store layouts

def resolve_codecs(spec: str | Mapping[str, str] | None, shapes: Mapping[str, tuple[int, int]]
                   ) -> dict[str, str]:
    """``extract.codec`` -> {column: codec name} for the store's columns (``shapes``: column ->
    (N, D)). ``spec``: one name, or {column: name, "default": name}; None = raw. A default (a plain
    name is one) scales only columns of more than one token: a single-token column (ViViT's CLS,
    0.01% of a clip's bytes) stays raw, since a scale per value costs more than the value.
    Unknown codecs or columns, or a scaled codec named for a single-token column, fail naming
    them."""
    spec = {"default": spec or DEFAULT} if spec is None or isinstance(spec, str) else dict(spec)
    unknown = sorted(set(spec) - set(shapes) - {"default"})
    if unknown:
        raise ValueError(f"codec: unknown column(s) {', '.join(unknown)}; the store has "
                         f"{', '.join(shapes)} (and 'default')")
    out = {}
    for n, (tokens, _) in shapes.items():
        name = spec.get(n, spec.get("default", DEFAULT))
        if tokens == 1 and get_codec(name, f"codec of column {n!r}: ").scaled:
            if n in spec:
                raise ValueError(f"codec of column {n!r}: {name} needs more than one token per "
                                 f"clip (a per-channel scale per value costs more than the value)")
            name = DEFAULT
        out[n] = get_codec(name, f"codec of column {n!r}: ").name
    return out


def row_bytes(layout: Mapping) -> int:
    """Bytes of one clip's stored row for ``layout`` {"shape": [N, D], "dtype", "codec"?}."""
    codec = get_codec(layout.get("codec", DEFAULT))
    return codec.row_bytes(tuple(layout["shape"]), layout["dtype"])


def parquet_compression(layouts: Mapping[str, Mapping], others: list[str]) -> dict[str, str]:
    """pyarrow's per-column ``compression`` for a shard: each tensor column's codec's
    (``layouts``: column -> layout), "none" for ``others`` (the id columns)."""
    return {**dict.fromkeys(others, "none"),
            **{k: get_codec(v.get("codec", DEFAULT)).compression for k, v in layouts.items()}}


def encode(x: torch.Tensor, codec: str) -> torch.Tensor:
    """(B, N, D) features (fp16/bf16/fp32, any device) -> (B, row_bytes) uint8 rows of ``codec``."""
    return get_codec(codec).encode(x)


def decode(raw: torch.Tensor, layout: Mapping, out_dtype: torch.dtype | None = None
           ) -> torch.Tensor:
    """One column's stored rows -> (B, N, D) values on raw's device. ``raw``: (B, row_bytes(layout))
    uint8 (for ``raw`` also the (B, N, D) tensor in the layout's dtype); ``out_dtype``: None = the
    layout's dtype."""
    out = TORCH_DTYPES[layout["dtype"]] if out_dtype is None else out_dtype
    codec = get_codec(layout.get("codec", DEFAULT))
    return codec.decode(raw, tuple(layout["shape"]), layout["dtype"], out)


def decode_columns(raw: Mapping[str, torch.Tensor], layouts: Mapping[str, Mapping],
                   out_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The training reader's decode step, on the device the rows are on.

    ``raw``: {column: (B, row_bytes) uint8 rows as stored} (``FeatureStore.stored_rows`` gives them
    on the host without per-element work; move them to the GPU first); ``layouts``:
    ``FeatureStore.layouts()``. Returns {column: (B, N, D) out_dtype} on the same device.
    """
    return {k: decode(v, layouts[k], out_dtype) for k, v in raw.items()}
