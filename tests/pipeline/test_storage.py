"""Storage.download: flat and recursive copies to a local directory, local and on a real S3
endpoint; the URL and timestamp helpers."""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from pipeline.storage import Storage, is_remote, utc_now


def _tree(root: Path) -> None:
    (root / "m" / "sub").mkdir(parents=True)
    (root / "m" / "config.json").write_text("{}")
    (root / "m" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (root / "m" / "sub" / "extra.txt").write_text("nested")


def _files(d: str | Path) -> dict[str, bytes]:
    d = Path(d)
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


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
    # the files directly under m/
    assert _files(flat) == {"config.json": b"{}", "weights.bin": b"\x00\x01" * 100}
    deep = storage.child("m").download("", str(tmp_path / "deep"), recursive=True)
    assert _files(deep) == _files(src / "m")
    with pytest.raises(FileNotFoundError, match="nope is not a directory"):
        storage.download("nope", str(tmp_path / "x"))


def test_is_remote_and_utc_now():
    assert is_remote("s3://b/k") and is_remote("memory://x/y")
    assert not is_remote("/abs/path") and not is_remote("rel/path") and not is_remote("file:///a/b")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now())
    assert re.fullmatch(r"\d{8}T\d{6}Z", utc_now(basic=True))
    # both forms are ISO 8601 that datetime reads back, as UTC
    for stamp in (utc_now(), utc_now(basic=True)):
        t = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ" if "-" in stamp else "%Y%m%dT%H%M%SZ")
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        assert abs((now - t).total_seconds()) < 60


def test_storage_errors_name_the_url_and_the_cause(tmp_path, s3_server):
    """A failed storage call inside ``storage_errors`` becomes one line naming the storage URL
    (not only botocore's http URL) and the cause; a missing object stays a FileNotFoundError;
    errors that are not the storage's pass unchanged."""
    import socket

    from pipeline.storage import StorageError, StorageNotFoundError, storage_errors
    local = Storage(str(tmp_path))
    with pytest.raises(StorageNotFoundError) as err, storage_errors("reading", local.url()):
        local.read_bytes("missing.json")
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value).startswith(f"reading {tmp_path}: does not exist (")
    with pytest.raises(ValueError, match="^not storage$"), storage_errors("x", "y"):
        raise ValueError("not storage")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = Storage("s3://some-bucket/p", {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k",
                                          "secret": "s", "config_kwargs": {
                                              "retries": {"max_attempts": 1}}})
    with pytest.raises(StorageError) as err, storage_errors("writing to", down.url()):
        down.write_bytes("a.json", b"{}")
    assert str(err.value).startswith("writing to s3://some-bucket/p: endpoint unreachable: Could "
                                     f"not connect to the endpoint URL: \"http://127.0.0.1:{port}")
    gone = Storage(f"s3://no-such-bucket-{port}/p", s3_server.storage_options)
    with pytest.raises(StorageNotFoundError, match="does not exist"), \
            storage_errors("writing to", gone.url()):
        gone.write_bytes("a.json", b"{}")


def test_storage_cause_finds_the_client_error_inside_wrappers():
    """``storage_cause`` opens exception chains and Ray Train's wrappers (``worker_failures``,
    ``controller_failure``) down to the storage client's own error; None when there is none."""
    from botocore.exceptions import EndpointConnectionError

    from pipeline.storage import StorageError, storage_cause
    root = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")

    class Controller(Exception):
        controller_failure = None

    class Group(Exception):
        worker_failures = None

    try:
        try:
            raise root
        except EndpointConnectionError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as e:
        group = Group("group")
        group.worker_failures = {0: ValueError("other"), 1: e}
    ctl = Controller("controller")
    ctl.controller_failure = group
    assert storage_cause(ctl) is root
    assert storage_cause(ValueError("no storage here")) is None
    assert storage_cause(StorageError("ours: already one line")) is None  # never re-wrapped
