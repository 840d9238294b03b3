"""Shared fixtures. GPU tests are skipped without CUDA; Ray test clusters run without token auth.

Video fixtures (session-scoped, real files):
  ``sample_videos`` -> Path of the labelled sample tree ``<label>/<file>.mp4`` (pipeline.samples:
      animation/bigbuckbunny, carphone/{carphone_pristine,carphone_distorted}, outdoor/bikes).
  ``sample_files`` -> dict file name -> Path inside ``sample_videos``.
  ``bad_videos`` -> dict name -> Path (tests/data_tools.py says how each is made): broken ones
      (data_tools.BROKEN: truncated, truncated_midstream, corrupt_midstream, random_bytes, empty,
      text, audio_only, too_short) and valid ones in other codecs (data_tools.VALID_OTHER_CODECS:
      webm_vp9, avi_mpeg4, mpg_mpeg2) and one that is no video (data_tools.NOT_VIDEO: m4a_audio).
      Needs ffmpeg on PATH (fails with a clear message otherwise).
Ray fixture:
  ``ray_cluster`` -> the ``ray`` module, initialised with a real local cluster for the test module
      (2 CPUs, 500 MiB object store, loopback only, Ray Train's controller polling its workers
      every 0.2 s); a cluster already running is reused as is.
S3 fixture:
  ``s3_server`` -> S3Endpoint: a real moto ThreadedMotoServer on 127.0.0.1 (free port) with
      ``.endpoint_url``, ``.storage_options`` (endpoint_url/key/secret, the Storage/sources form),
      ``.make_bucket(prefix) -> unique bucket name``, ``.fs()`` -> s3fs filesystem, and
      ``.upload(local_dir, url)``.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------- videos

@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    from pipeline.samples import sample_dir
    return sample_dir(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="session")
def sample_files(sample_videos) -> dict[str, Path]:
    return {p.name: p for p in sorted(sample_videos.glob("*/*.mp4"))}


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory, sample_files) -> dict[str, Path]:
    from data_tools import make_test_videos, require_ffmpeg
    try:
        require_ffmpeg()
    except RuntimeError as e:
        pytest.fail(str(e))
    return make_test_videos(sample_files, tmp_path_factory.mktemp("bad_videos"))


# ---------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        if started:
            # the controller takes each report at its health check (2 s by default; test runs
            # checkpoint every few ms): a shorter interval keeps them short, it changes nothing
            # they check. Set before ray.init: the cluster's processes inherit it.
            mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=500 * 2**20, log_to_driver=True)
        yield ray
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- S3 (moto server)

@dataclass
class S3Endpoint:
    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"
    _counter: itertools.count = field(default_factory=itertools.count)

    @property
    def storage_options(self) -> dict:
        """Short form accepted by pipeline.storage.Storage and SourcesConfig.storage_options."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def fs(self):
        import s3fs
        # no region_name in client_kwargs: moto serves every region at this endpoint
        return s3fs.S3FileSystem(key=self.key, secret=self.secret, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint_url})

    def make_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{os.getpid()}-{next(self._counter)}"
        self.fs().mkdir(name)
        return name

    def upload(self, local_dir: str | Path, url: str) -> None:
        """Copy every file under ``local_dir`` to ``url`` (s3://bucket/prefix), keeping relative
        paths."""
        fs = self.fs()
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{url.rstrip('/')}/{p.relative_to(local_dir).as_posix()}")


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer
    with pytest.MonkeyPatch.context() as mp:
        # botocore needs some credentials to sign requests; moto accepts any
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(var, "testing")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield S3Endpoint(endpoint_url=f"http://{host}:{port}")
        finally:
            server.stop()
