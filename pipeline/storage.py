"""Storage is always an fsspec URL: a local path, ``file://...``, or ``s3://bucket/prefix``
(s3fs; pass ``endpoint_url`` in ``options`` for MinIO or another S3-compatible store)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(url: str) -> bool:
    """True for a URL fsspec fetches from elsewhere (``s3://``, ``memory://``...); False for a local
    path or a ``file://`` URL."""
    return "://" in url and not url.startswith("file://")


def utc_now(*, basic: bool = False) -> str:
    """The current UTC time to the second, ISO 8601: ``2026-12-02T10:00:00Z`` (records), or the
    basic form ``20261202T100000Z`` (names of versions and runs: no colons)."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ" if basic else "%Y-%m-%dT%H:%M:%SZ")


def _s3fs_options(options: dict[str, Any]) -> dict[str, Any]:
    """Accept the short form ``endpoint_url`` (as users write it) and pass it the way s3fs wants."""
    opts = dict(options)
    endpoint = opts.pop("endpoint_url", None)
    if endpoint:
        opts.setdefault("client_kwargs", {})
        opts["client_kwargs"] = {**opts["client_kwargs"], "endpoint_url": endpoint}
    return opts


class Storage:
    """A root URL plus fsspec options; picklable, so Ray tasks and actors can carry it.

    ``path(*parts)`` gives the filesystem path under the root; ``url(*parts)`` the full URL
    (with protocol) for tools that want one.
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.root_url = url.rstrip("/") or url
        self.options = dict(options or {})
        self._fs = None

    @property
    def protocol(self) -> str:
        return self.root_url.split("://", 1)[0] if "://" in self.root_url else "file"

    def fs_options(self) -> dict[str, Any]:
        return _s3fs_options(self.options) if self.protocol in ("s3", "s3a") else dict(self.options)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, root = url_to_fs(self.root_url, **self.fs_options())
            self._root = root
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018  (resolves the root path)
        return self._root

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url(self, *parts: str) -> str:
        p = self.path(*parts)
        return p if self.protocol == "file" else f"{self.protocol}://{p}"

    def child(self, *parts: str) -> Storage:
        return Storage(self.url(*parts), self.options)

    def download(self, rel: str, dest: str, *, recursive: bool = False) -> str:
        """Copy the files directly under ``rel`` ("" = the root) into local directory ``dest``, and
        its subdirectories too when ``recursive``; returns ``dest``. FileNotFoundError if ``rel`` is
        no directory."""
        src = self.path(rel) if rel else self.path()
        if not self.fs.isdir(src):
            where = self.url(rel) if rel else self.url()
            raise FileNotFoundError(f"{where} is not a directory")
        os.makedirs(dest, exist_ok=True)
        if recursive:
            self.fs.get(src.rstrip("/") + "/", dest.rstrip("/") + "/", recursive=True)
            return dest
        for info in self.fs.ls(src, detail=True):
            if info["type"] == "file":
                name = posixpath.basename(info["name"].rstrip("/"))
                self.fs.get_file(info["name"], os.path.join(dest, name))
        return dest

    def pyarrow_filesystem(self):
        """This storage as a pyarrow filesystem (Ray Data readers, Ray Train's storage_filesystem):
        pyarrow's own for local paths, the fsspec one (endpoint/options included) wrapped
        otherwise."""
        import pyarrow.fs as pafs
        if self.protocol == "file":
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with self.fs.open(p, "wb") as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str, default: Any = ...) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            if default is ...:
                raise
            return default

    def ls(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; [] when it does not exist."""
        try:
            paths = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in paths)

    def __getstate__(self):
        return {"root_url": self.root_url, "options": self.options, "_fs": None}

    def __repr__(self) -> str:
        return f"Storage({self.root_url!r})"
