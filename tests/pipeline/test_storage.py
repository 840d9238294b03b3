"""Storage.download: flat and recursive copies to a local directory, local and on a real S3 endpoint."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.storage import Storage


def _tree(root: Path) -> None:
    (root / "m" / "sub").mkdir(parents=True)
    (root / "m" / "config.json").write_text("{}")
    (root / "m" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (root / "m" / "sub" / "extra.txt").write_text("nested")


def _files(d: str | Path) -> dict[str, bytes]:
    d = Path(d)
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_download_flat_and_recursive(where, tmp_path, request):
    src = tmp_path / "src"
    _tree(src)
    if where == "local":
        storage = Storage(str(src))
    else:
        s3 = request.getfixturevalue("s3_server")
        bucket = s3.make_bucket("dl")
        s3.upload(src, f"s3://{bucket}/root")
        storage = Storage(f"s3://{bucket}/root", s3.storage_options)
    flat = storage.download("m", str(tmp_path / "flat"))
    assert _files(flat) == {"config.json": b"{}", "weights.bin": b"\x00\x01" * 100}  # files directly under m/
    deep = storage.child("m").download("", str(tmp_path / "deep"), recursive=True)
    assert _files(deep) == _files(src / "m")
    with pytest.raises(FileNotFoundError, match="nope is not a directory"):
        storage.download("nope", str(tmp_path / "x"))
