"""pipeline.artifacts: model directories, the registry (versions, latest) and the train.json
pointer, on local storage and on a real S3 endpoint (moto server); real converters and heads."""
from __future__ import annotations

import datetime as dt
import os
import re

import numpy as np
import pytest
import torch
from tiny_features import CLASS_NAMES, SPECS, STUDENT, TEACHERS

from pipeline.artifacts import (
    PUBLISHED,
    STANDARDIZATION,
    LoadedModel,
    ModelRegistry,
    job_run_dir,
    load_model_dir,
    load_standardization,
    load_trained,
    load_weights,
    read_trained,
    save_model_dir,
    save_standardization,
    stats_tensors,
    write_trained,
)
from pipeline.config import TrainConfig
from pipeline.storage import Storage
from pipeline.train import build_models

# targets in the order a feature store gives them (meta.json is written with sorted keys): the head
# concatenates targets in dict order and tokconv.io saves head.json with sorted keys
STORE_SPECS = {k: SPECS[k] for k in sorted(SPECS)}


def _models(seed: int, head: bool = True):
    torch.manual_seed(seed)
    cfg = TrainConfig(head={"enabled": head, "hidden": 16})
    return build_models(cfg, STORE_SPECS, len(CLASS_NAMES))


def _stats(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {t: {"mean": rng.standard_normal(s.dim), "std": rng.uniform(0.5, 2.0, s.dim)}
            for t, s in TEACHERS.items()}


def _outputs(converter, head, x):
    with torch.no_grad():
        out = converter.eval().forward_all(x)
        return out, (head.eval()(x, out) if head is not None else None)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3_server")
    return Storage(f"s3://{s3.make_bucket('artifacts')}/root", s3.storage_options)


def _model_dir(path: str, seed: int, head: bool = True) -> tuple:
    conv, h = _models(seed, head)
    save_model_dir(conv, h, path)
    mean, std = stats_tensors(_stats(seed), TEACHERS)
    save_standardization(mean, std, os.path.join(path, STANDARDIZATION))
    return conv, h, mean, std


def test_model_dir_round_trip_with_and_without_head(tmp_path):
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    conv, head = _models(0)
    save_model_dir(conv, head, str(tmp_path / "a"))
    conv2, head2 = load_model_dir(str(tmp_path / "a"))
    assert not conv2.training and not head2.training
    (o1, l1), (o2, l2) = _outputs(conv, head, x), _outputs(conv2, head2, x)
    assert all(torch.equal(o1[t], o2[t]) for t in TEACHERS) and torch.equal(l1, l2)

    conv, _ = _models(1, head=False)
    save_model_dir(conv, None, str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "model.safetensors"]
    conv3, head3 = load_model_dir(str(tmp_path / "b"))
    assert head3 is None
    assert torch.equal(_outputs(conv, None, x)[0]["vivit"], _outputs(conv3, None, x)[0]["vivit"])


def test_load_weights_copies_a_model_dir_into_fresh_modules(tmp_path):
    conv, head = _models(0)
    save_model_dir(conv, head, str(tmp_path))
    fresh_conv, fresh_head = _models(5)
    assert not torch.equal(next(fresh_conv.parameters()), next(conv.parameters()))
    load_weights(fresh_conv, fresh_head, str(tmp_path))
    for a, b in ((conv, fresh_conv), (head, fresh_head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # a directory without a head leaves the head's own weights alone
    save_model_dir(conv, None, str(tmp_path / "nohead"))
    other_conv, other_head = _models(6)
    before = {k: v.clone() for k, v in other_head.state_dict().items()}
    load_weights(other_conv, other_head, str(tmp_path / "nohead"))
    assert all(torch.equal(before[k], v) for k, v in other_head.state_dict().items())
    assert torch.equal(next(other_conv.parameters()), next(conv.parameters()))


def test_stats_and_standardization_round_trip(tmp_path):
    stats = _stats(3)
    mean, std = stats_tensors(stats, ["videomae", "vivit"])
    assert set(mean) == set(std) == {"videomae", "vivit"}
    assert mean["vivit"].dtype == torch.float32 and mean["vivit"].shape == (TEACHERS["vivit"].dim,)
    np.testing.assert_allclose(std["videomae"].numpy(), stats["videomae"]["std"], rtol=1e-6)
    # plain lists (the train workers' form) give the same tensors
    plain = {t: {k: list(map(float, v)) for k, v in d.items()} for t, d in stats.items()}
    assert all(torch.equal(a, b) for a, b in zip(stats_tensors(plain, ["vivit"])[1].values(),
                                                 stats_tensors(stats, ["vivit"])[1].values()))
    save_standardization(mean, std, str(tmp_path / STANDARDIZATION))
    mean2, std2 = load_standardization(str(tmp_path / STANDARDIZATION))
    assert set(mean2) == {"videomae", "vivit"}
    assert all(torch.equal(mean[t], mean2[t]) and torch.equal(std[t], std2[t]) for t in mean)


def test_registry_versions_latest_download_and_load(storage, tmp_path):
    reg = ModelRegistry(storage, "tc")
    assert reg.latest() is None
    with pytest.raises(FileNotFoundError, match=re.escape(reg.url("latest.json"))):
        reg.resolve("latest")
    with pytest.raises(FileNotFoundError, match="tc/v9 not found"):
        reg.download("v9", str(tmp_path / "nothing"))

    conv, head, mean, std = _model_dir(str(tmp_path / "v1"), seed=1)
    assert reg.new_version("v1") == "v1"
    files = sorted(os.listdir(tmp_path / "v1"))
    uri = reg.publish("v1", str(tmp_path / "v1"), files)
    assert uri == storage.url("models", "tc", "v1") and reg.exists("v1")
    assert reg.latest() is None  # published, not promoted
    with pytest.raises(FileExistsError, match="immutable"):
        reg.new_version("v1")
    assert reg.read_json("v1", "head.json")["kwargs"]["hidden"] == 16
    assert reg.read_json("v1", "metrics.json") is None

    written = reg.promote("v1", metric="mean_cosine", value=0.5)
    latest = reg.latest()
    assert latest == written and latest["version"] == "v1" and latest["uri"] == uri
    assert latest["value"] == 0.5 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                                                   latest["promoted_at"])
    assert reg.resolve("latest") == "v1" and reg.resolve("v7") == "v7"

    d = reg.download("latest", str(tmp_path / "copy"))
    assert sorted(os.listdir(d)) == sorted([*files, PUBLISHED])
    model = reg.load()
    assert isinstance(model, LoadedModel) and model.version == "v1"
    x = torch.randn(3, STUDENT.tokens, STUDENT.dim)
    (o1, l1), (o2, l2) = _outputs(conv, head, x), _outputs(model.converter, model.head, x)
    assert all(torch.equal(o1[t], o2[t]) for t in TEACHERS) and torch.equal(l1, l2)
    assert all(torch.equal(mean[t], model.mean[t]) and torch.equal(std[t], model.std[t])
               for t in TEACHERS)

    # a second version without a head; latest stays until promoted
    _model_dir(str(tmp_path / "v2"), seed=2, head=False)
    reg.publish("v2", str(tmp_path / "v2"), sorted(os.listdir(tmp_path / "v2")))
    assert reg.load("v2").head is None and reg.load().version == "v1"


def test_a_version_is_complete_only_with_its_marker_and_then_immutable(storage, tmp_path):
    """A publish that stopped part-way (files up, no _published.json) is not downloadable, its
    version can be requested again and the re-publish completes it; a published one is refused."""
    reg = ModelRegistry(storage, "tc")
    _model_dir(str(tmp_path / "v3"), seed=3)
    files = sorted(os.listdir(tmp_path / "v3"))
    dest = storage.path("models", "tc", "v3")
    storage.fs.makedirs(dest, exist_ok=True)
    for f in files[:2]:  # an upload cut off after two files
        storage.fs.put_file(str(tmp_path / "v3" / f), f"{dest}/{f}")
    assert reg.exists("v3") and not reg.is_published("v3")
    with pytest.raises(FileNotFoundError, match="v3 .* is incomplete"):
        reg.download("v3", str(tmp_path / "partial"))
    assert reg.new_version("v3") == "v3"  # unfinished: redone, not refused
    reg.publish("v3", str(tmp_path / "v3"), files)
    marker = reg.read_json("v3", PUBLISHED)
    assert marker["version"] == "v3" and marker["files"] == {
        f: os.path.getsize(tmp_path / "v3" / f) for f in files}
    assert reg.load("v3").version == "v3"
    with pytest.raises(FileExistsError, match="immutable"):
        reg.publish("v3", str(tmp_path / "v3"), files)
    with pytest.raises(FileExistsError, match="immutable"):
        reg.new_version("v3")


def test_a_version_latest_names_loads_without_a_marker(storage, tmp_path):
    """A registry written before _published.json existed: the version latest.json names (written
    after its files) loads and stays immutable; another marker-less version does not load."""
    reg = ModelRegistry(storage, "tc")
    for v in ("old", "other"):
        _model_dir(str(tmp_path / v), seed=4)
        dest = storage.path("models", "tc", v)
        storage.fs.makedirs(dest, exist_ok=True)
        for f in sorted(os.listdir(tmp_path / v)):
            storage.fs.put_file(str(tmp_path / v / f), f"{dest}/{f}")
    reg.promote("old", metric="mean_cosine", value=0.5)
    assert reg.is_published("old") and not reg.is_published("other")
    assert reg.load().version == "old"
    with pytest.raises(FileExistsError, match="immutable"):
        reg.new_version("old")
    with pytest.raises(FileNotFoundError, match="other .* is incomplete"):
        reg.download("other", str(tmp_path / "dl"))


def test_new_version_is_a_utc_stamp_and_never_reuses_one(tmp_path):
    storage = Storage(str(tmp_path))
    reg = ModelRegistry(storage, "tc")
    first = reg.new_version()
    assert re.fullmatch(r"\d{8}T\d{6}Z", first)
    # this second's stamp and the next four are taken: the next version gets a suffix
    t0 = dt.datetime.strptime(first, "%Y%m%dT%H%M%SZ")
    stamps = [(t0 + dt.timedelta(seconds=i)).strftime("%Y%m%dT%H%M%SZ") for i in range(5)]
    for s in stamps:
        storage.fs.makedirs(storage.path("models", "tc", s), exist_ok=True)
    second = reg.new_version()
    assert second in {f"{s}-1" for s in stamps}, second
    with pytest.raises(ValueError, match="plain name"):
        ModelRegistry(storage, "a/b")


def test_trained_pointer_round_trip(storage, tmp_path):
    run_dir = job_run_dir("job1")
    assert run_dir == "runs/job1"
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        read_trained(storage, run_dir)
    conv, head, _, _ = _model_dir(str(tmp_path / "ckpt"), seed=4)
    rel = f"{run_dir}/train-x/checkpoint_000001"
    storage.fs.makedirs(storage.path(rel), exist_ok=True)
    for f in os.listdir(tmp_path / "ckpt"):
        storage.fs.put_file(str(tmp_path / "ckpt" / f), storage.path(rel, f))
    url = write_trained(storage, run_dir, {"checkpoint_rel": rel, "checkpoint": storage.url(rel)})
    assert url == storage.url(run_dir, "train.json")
    assert read_trained(storage, run_dir)["checkpoint_rel"] == rel
    conv2, head2, info = load_trained(storage, run_dir, str(tmp_path / "dest"))
    assert info["checkpoint"] == storage.url(rel)
    x = torch.randn(1, STUDENT.tokens, STUDENT.dim)
    (o1, l1), (o2, l2) = _outputs(conv, head, x), _outputs(conv2, head2, x)
    assert all(torch.equal(o1[t], o2[t]) for t in TEACHERS) and torch.equal(l1, l2)
