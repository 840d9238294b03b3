"""Storage is always an fsspec URL: a local path, ``file://...``, or ``s3://bucket/prefix``
(s3fs; pass ``endpoint_url`` in ``options`` for MinIO or another S3-compatible store).

S3 options go to ``s3fs.S3FileSystem`` as they are (plus the short form ``endpoint_url``):
``key``/``secret``/``token``, ``client_kwargs`` (boto client: ``region_name``...) and
``config_kwargs``, which s3fs hands to ``botocore.config.Config``; that is where retries live::

    options: {config_kwargs: {retries: {max_attempts: 10, mode: adaptive},
                              connect_timeout: 5, read_timeout: 30}}

botocore retries throttling, 5xx responses and connection errors with backoff (modes
``standard``, ``adaptive``; by default ``legacy``, 5 attempts); s3fs itself retries timeouts and
broken connections of a call (its class attribute ``retries``, 5). ``mask_secrets`` hides the
credentials among these options wherever a config or summary is printed or stored.
``storage_errors(what, url)`` turns a failed storage call into one ``StorageError`` line naming
the URL (botocore's own messages name the endpoint's http URL) and the cause (``error_reason``).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import posixpath
import re
import time
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

# URL schemes the pipeline reads and writes (plus plain local paths); memory: one process only
PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "memory")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def is_remote(url: str) -> bool:
    """True for a URL fsspec fetches from elsewhere (``s3://``, ``memory://``...); False for a local
    path or a ``file://`` URL."""
    return "://" in url and not url.startswith("file://")


def utc_now(*, basic: bool = False) -> str:
    """The current UTC time to the second, ISO 8601: ``2026-12-02T10:00:00Z`` (records), or the
    basic form ``20261202T100000Z`` (names of versions and runs: no colons)."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ" if basic else "%Y-%m-%dT%H:%M:%SZ")


# option keys that hold credentials (matched on the lower-cased key, '-' read as '_')
_SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credentials?)"
                         r"|.*(_key|_key_id|_secret|_token|_password)|.*(secret|password|credential).*")
_URL_USERINFO = re.compile(r"(://[^/@:\s]+:)[^/@\s]+@")
MASK = "***"


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` (a config dump, options, a summary) with credentials replaced by
    ``MASK``: values under keys such as key, secret, token, password, session_token,
    aws_secret_access_key, *_api_key, and the password of ``scheme://user:password@host`` URLs."""
    if isinstance(value, dict):
        return {k: MASK if (_SECRET_KEY.fullmatch(str(k).lower().replace("-", "_"))
                            and v not in (None, "")) else mask_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(rf"\1{MASK}@", value)
    return value


def bucket_problem(name: str) -> str | None:
    """Why S3 would refuse ``name`` as a bucket name (AWS rules), or None when it is valid."""
    if not _BUCKET.fullmatch(name):
        return (f"bucket name {name!r} is not valid: 3-63 characters of a-z, 0-9, '.' and '-', "
                f"starting and ending with a letter or digit")
    if ".." in name or _IPV4.fullmatch(name):
        return f"bucket name {name!r} is not valid: no '..' and not an IP address"
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        return f"bucket name {name!r} is not valid: reserved prefix or suffix"
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a storage location (unsupported scheme, missing filesystem package,
    bad S3 bucket name), or None. Checks the text only: nothing is contacted."""
    if "://" not in url:
        return None if url else "empty URL"
    scheme, rest = url.split("://", 1)
    if scheme not in PROTOCOLS:
        return (f"scheme {scheme!r} is not supported; supported: {', '.join(PROTOCOLS)} "
                f"or a local path")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        return f"scheme {scheme!r}: {e}"
    if scheme in ("s3", "s3a"):
        bucket = rest.split("/", 1)[0]
        if "@" in bucket:  # never echoed: it may hold a password
            return "credentials in an s3:// URL are not read: give key/secret in the options"
        return bucket_problem(bucket) if bucket else f"no bucket in {url!r}"
    return None


# ------------------------------------------------------------------------------------ errors

def first_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message, stripped ('' when there is none)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


def wrapped_errors(e: BaseException) -> list[BaseException]:
    """The errors ``e`` wraps the way Ray does, in this order: Ray Train's ``worker_failures`` (by
    rank), a task error's ``cause``, Ray Train's ``controller_failure``."""
    failures = getattr(e, "worker_failures", None)
    out = list(failures.values()) if isinstance(failures, dict) else []
    return out + [x for a in ("cause", "controller_failure")
                  if isinstance(x := getattr(e, a, None), BaseException)]


def error_reason(e: BaseException) -> str:
    """A storage error as a short cause: missing credentials, an unreachable endpoint, access
    denied, or the error's own first line."""
    kinds = {c.__name__ for c in type(e).__mro__}
    text = first_line(e)
    if "NoCredentialsError" in kinds or "PartialCredentialsError" in kinds:
        return (f"no credentials ({text}): set key/secret in the options, AWS_ACCESS_KEY_ID/"
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role")
    if kinds & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}:
        return f"endpoint unreachable: {text}"
    if isinstance(e, PermissionError):
        return f"access denied: {text}"
    if isinstance(e, FileNotFoundError):
        return f"does not exist ({text})" if text else "does not exist"
    return f"{type(e).__name__}: {text}"


class StorageError(OSError):
    """A storage call failed: one line, ``<what> <url>: <cause>`` (``storage_errors``)."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A StorageError whose cause is a missing object or bucket (still a FileNotFoundError)."""


# where the errors of storage clients come from (s3fs re-raises botocore's connection errors)
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3")


def _from_storage(e: BaseException) -> bool:
    return isinstance(e, OSError) or any(c.__module__.split(".")[0] in _STORAGE_MODULES
                                         for c in type(e).__mro__)


def storage_cause(e: BaseException) -> BaseException | None:
    """The storage client's error inside ``e`` or its wrappers (``__cause__``/``__context__`` and
    Ray's, ``wrapped_errors``), or None."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if _from_storage(x) and not isinstance(x, StorageError):
            return x
        todo += [*wrapped_errors(x), x.__cause__, x.__context__]
    return None


@contextlib.contextmanager
def storage_errors(what: str, url: str):
    """Re-raise an error of a storage client inside the block as ``StorageError("<what> <url>:
    <cause>")`` (the original as its ``__cause__``); other errors pass as they are."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if not _from_storage(e):
            raise
        kind = StorageNotFoundError if isinstance(e, FileNotFoundError) else StorageError
        raise kind(f"{what} {url}: {error_reason(e)}") from e


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

    def makedirs(self, path: str) -> None:
        """Make the directory ``path`` (a filesystem path) for a local root; nothing elsewhere:
        object stores need no directories, and s3fs would create a missing (e.g. removed) bucket
        instead of failing."""
        if self.protocol == "file":
            self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        self.makedirs(posixpath.dirname(p))
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


# ------------------------------------------------------------------- conditional writes (leases)

def create_exclusive(storage: Storage, rel: str, data: bytes) -> bool:
    """Write ``rel`` only if it does not exist yet; True when this call created it, False when it
    existed. Atomic where it matters: a local path is linked into place from a complete temporary
    file (``os.link`` fails on an existing name, also on NFS; readers never see a partial file),
    S3 gets a conditional PUT (``If-None-Match: *``: 412 when the key exists; 409
    ConditionalRequestConflict while another conditional write to the key is in flight, which AWS
    says to retry: retried here up to 5 times). Other fsspec backends get their own
    ``mode="create"`` (fsspec's default checks, then writes: not atomic)."""
    p = storage.path(rel)
    if storage.protocol == "file":
        os.makedirs(posixpath.dirname(p), exist_ok=True)
        tmp = f"{p}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, p)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    attempt = 0
    while True:
        try:
            storage.fs.pipe_file(p, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if attempt == 5 or not _conditional_conflict(e):
                raise
            time.sleep(0.05 * 2 ** attempt)  # the other write settles: the retry gets 200 or 412
            attempt += 1


def _conditional_conflict(e: OSError) -> bool:
    """S3's 409 ConditionalRequestConflict (s3fs turns it into a plain OSError; botocore does not
    retry it)."""
    resp = getattr(e.__cause__, "response", None) or {}
    return (resp.get("Error", {}).get("Code") == "ConditionalRequestConflict"
            or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 409)


def replace_atomic(storage: Storage, rel: str, data: bytes) -> None:
    """Overwrite ``rel`` so a reader sees the old or the new bytes, never a mix: a local path is
    renamed over from a temporary file; an object-store PUT is atomic by itself."""
    if storage.protocol != "file":
        storage.write_bytes(rel, data)
        return
    p = storage.path(rel)
    os.makedirs(posixpath.dirname(p), exist_ok=True)
    tmp = f"{p}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)
