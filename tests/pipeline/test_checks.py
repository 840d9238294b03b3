"""Config refused at load (pipeline.checks.check_job and the config's field checks): each case the
issue found, through load_job and through the CLI's --print-config; credentials masked; the
promotion metrics are the ones evaluate writes; S3 retry options reach the filesystem."""
from __future__ import annotations

import json

import pytest

from pipeline.__main__ import main
from pipeline.checks import converter_keywords
from pipeline.config import VIDEO_EXTENSIONS, ConfigError, JobConfig, load_job
from pipeline.storage import MASK, Storage, bucket_problem, mask_secrets, url_problem
from tokconv.registry import list_converters

SMOKE = "jobs/smoke.yaml"
MODELS = "student, videomae, timesformer, vivit"
TEACHERS = "videomae, timesformer, vivit"

# (overrides, the key the message names, a part of the allowed values it lists)
ISSUE_CASES = [
    (["models.compile=[nope]"], "models.compile", f"unknown model name(s) nope; allowed: {MODELS}"),
    (["models.fp8=[studnet]"], "models.fp8", f"unknown model name(s) studnet; allowed: {MODELS}"),
    (["train.loss.target_weights={vivt: 2}"], "train.loss.target_weights",
     f"unknown target(s) vivt; allowed: {TEACHERS}"),
    (["train.converter=perceiver_small", "train.converter_kwargs={n_latt: 3}"],
     "train.converter_kwargs", ("unknown key(s) n_latt for converter perceiver_small; allowed: "
                                "n_lat, d_lat, d_dec, depth, heads")),
    (["export.metric=mean_cosin"], "export.metric",
     ("'mean_cosin' is not a metric the evaluate stage writes; allowed: mean_cosine, mean_mse, "
      "mean_r2, top1, top5, targets.videomae.cosine")),
    (["evaluate.split=vla"], "evaluate.split", "Input should be 'train' or 'val' (got 'vla')"),
    (["sources.labels=manifest"], "sources.labels",
     ("=manifest needs sources.manifest (a CSV/JSONL/Parquet file of path,label[,split]); "
      "allowed without one: parent, none")),
    (["storage.url=s3://b/runs"], "storage.url", "bucket name 'b' is not valid: 3-63 characters"),
    (["train.best_metric=val.vidoemae.cosine"], "train.best_metric",
     ("'val.vidoemae.cosine' is not a validation metric; allowed: val.mean_cosine, val.top1, "
      "val.videomae.cosine, val.videomae.r2")),
    (["train.num_workers=0"], "train.num_workers",
     "a worker count >= 1, or auto: one per GPU (got 0)"),
]


@pytest.mark.parametrize("overrides, key, why", ISSUE_CASES, ids=[c[1] for c in ISSUE_CASES])
def test_issue_cases_fail_at_load_naming_key_and_allowed_values(overrides, key, why, capsys):
    with pytest.raises(ConfigError) as err:
        load_job(SMOKE, overrides)
    lines = str(err.value).splitlines()
    assert lines[0] == f"invalid job config ({SMOKE}):" and len(lines) == 2, lines
    assert lines[1].startswith(f"  {key}") and why in lines[1], lines[1]
    # --print-config validates the same way: exit 2, nothing on stdout, ONE line on stderr
    assert main(["run", SMOKE, "--print-config", *overrides]) == 2
    out, err_text = capsys.readouterr()
    assert out == ""
    assert err_text.count("\n") == 1
    assert err_text.startswith(f"error: invalid job config ({SMOKE}):")
    assert f": {key}" in err_text and why in err_text


def test_several_problems_are_reported_together_one_line_each():
    with pytest.raises(ConfigError) as err:
        load_job(SMOKE, ["models.compile=[nope]", "train.loss.target_weights={vivt: 2}",
                         "export.metric=top7"])
    lines = str(err.value).splitlines()[1:]
    assert [ln.split(":")[0].strip() for ln in lines] == [
        "models.compile", "train.loss.target_weights", "export.metric"]


@pytest.mark.parametrize("name", list_converters())
def test_converter_kwargs_follow_each_presets_constructor(name):
    allowed = converter_keywords(name)
    assert allowed is not None and "rank" not in allowed and "student" not in allowed
    job = load_job(None, [f"train.converter={name}"])
    assert job.train.converter == name
    for key, where in (("rank", "train.deficiency.rank"),
                       ("mask_ratio", "train.deficiency.mask_ratio")):
        with pytest.raises(ConfigError, match=rf"converter_kwargs.{key}: set {where} instead"):
            load_job(None, [f"train.converter={name}", f"train.converter_kwargs={{{key}: 2}}"])
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) zzz for converter {name}; allowed: "
                                          rf"{', '.join(allowed) or 'none'}$"):
        load_job(None, [f"train.converter={name}", "train.converter_kwargs={zzz: 1}"])


def test_converter_kwargs_values_are_checked_by_the_constructor():
    ok = load_job(None, ["train.converter=perceiver_small", "train.converter_kwargs={n_lat: 64}"])
    assert ok.train.converter_kwargs == {"n_lat": 64}
    with pytest.raises(ConfigError, match=r"converter perceiver_small refuses \{'heads': 7\}: "
                                          r".*not divisible by num_heads 7"):
        load_job(None, ["train.converter=perceiver_small", "train.converter_kwargs={heads: 7}"])


def test_export_metric_direction_and_head_metrics():
    with pytest.raises(ConfigError, match="mean_mse is better when lower; set "
                                          "export.higher_is_better=false"):
        load_job(SMOKE, ["export.metric=mean_mse"])
    assert load_job(SMOKE, ["export.metric=mean_mse", "export.higher_is_better=false"])
    assert load_job(SMOKE, ["export.metric=targets.vivit.r2"]).export.metric == "targets.vivit.r2"
    with pytest.raises(ConfigError, match="top1 needs the head and labels"):
        load_job(SMOKE, ["export.metric=top1", "train.head.enabled=false"])
    with pytest.raises(ConfigError, match="top5 needs the head and labels"):
        load_job(SMOKE, ["export.metric=top5", "sources.labels=none"])


def test_every_promotion_metric_is_in_what_evaluate_writes(tmp_path):
    """The one list (evaluate.promotion_metrics) against a real evaluate_model run: every key the
    check allows is a number in the metrics, read the way export reads it."""
    from tiny_features import TEACHERS as TINY_TEACHERS
    from tiny_features import make_tiny_store

    from pipeline.artifacts import stats_tensors
    from pipeline.evaluate import evaluate_model, promotion_metrics
    from pipeline.export import metric_value
    from pipeline.train import build_models
    store = make_tiny_store(Storage(str(tmp_path)))
    conv, head = build_models(JobConfig().train, store.specs(), 3)
    mean, std = stats_tensors(store.stats(), list(TINY_TEACHERS))
    metrics, _ = evaluate_model(conv, head, store.iter_torch(split="val", batch_size=4),
                                mean=mean, std=std)
    keys = promotion_metrics(TINY_TEACHERS)
    assert len(keys) == 3 + 2 + 3 * 3
    for key in keys:
        assert isinstance(metric_value(metrics, key), float), key


@pytest.mark.parametrize("name", ["abc", "my-bucket", "a.b-c", "tokconv", "x" * 63, "0bucket"])
def test_valid_bucket_names(name):
    assert bucket_problem(name) is None
    assert url_problem(f"s3://{name}/prefix") is None


@pytest.mark.parametrize("name", ["b", "ab", "x" * 64, "My-Bucket", "my_bucket", "-abc", "abc-",
                                  "a..b", "192.168.1.1", "xn--abc", "abc-s3alias"])
def test_invalid_bucket_names_are_refused_wherever_a_url_is(name):
    assert "is not valid" in bucket_problem(name)
    for key in ("storage.url", "sources.uri", "sources.manifest", "models.student.source",
                "extract.compile_cache"):
        with pytest.raises(ConfigError) as err:
            load_job(SMOKE, [f"{key}=s3://{name}/x"])
        assert f"  {key}: bucket name {name!r} is not valid" in str(err.value)


def test_url_schemes():
    assert url_problem("runs/x") is None and url_problem("file:///tmp/x") is None
    assert url_problem("memory://x/y") is None and url_problem("s3a://my-bucket/x") is None
    assert "no bucket" in url_problem("s3:///x")
    with pytest.raises(ConfigError, match=r"storage.url: scheme 'ftp' is not supported; supported: "
                                          r"file, s3, s3a, gs, gcs, memory or a local path"):
        load_job(SMOKE, ["storage.url=ftp://host/x"])
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        assert "gcsfs" in url_problem("gs://my-bucket/x")


def test_extensions_and_plain_names():
    assert set(VIDEO_EXTENSIONS) >= {"mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts",
                                     "mts", "m2ts", "3gp", "flv", "wmv", "ogv", "mxf"}
    job = load_job(SMOKE, ["sources.extensions=[.MP4, webm, mp4]"])
    assert job.sources.extensions == ["mp4", "webm"]
    assert load_job(SMOKE, ["sources.extensions=all"]).sources.extensions == "all"
    for bad in ("mp4", "[]", "['']"):
        with pytest.raises(ConfigError, match="  sources.extensions: a list of extensions such as"):
            load_job(SMOKE, [f"sources.extensions={bad}"])
    for key in ("name", "store", "model_name", "export.version"):
        with pytest.raises(ConfigError, match=f"  {key}: must be a plain name"):
            load_job(SMOKE, [f"{key}=a/b"])


def test_botocore_options_are_checked_at_load():
    good = "{config_kwargs: {retries: {max_attempts: 3, mode: adaptive}, connect_timeout: 2}}"
    assert load_job(SMOKE, [f"storage.options={good}"]).storage.options["config_kwargs"]
    with pytest.raises(ConfigError, match=r"  sources.storage_options.config_kwargs: Cannot "
                                          r"provide retry configuration for \"max_attemps\""):
        load_job(SMOKE, ["sources.storage_options={config_kwargs: {retries: {max_attemps: 3}}}"])
    with pytest.raises(ConfigError, match=r"  models.storage_options.config_kwargs: Invalid value "
                                          r"provided to \"mode\""):
        load_job(SMOKE, ["models.storage_options={config_kwargs: {retries: {mode: fast}}}"])


@pytest.mark.integration
def test_s3_retry_options_reach_the_botocore_client(s3_server):
    bucket = s3_server.make_bucket("retries")
    options = {**s3_server.storage_options,
               "config_kwargs": {"retries": {"max_attempts": 7, "mode": "adaptive"},
                                 "connect_timeout": 3, "read_timeout": 11}}
    job = load_job(SMOKE, [f"storage.url=s3://{bucket}/runs",
                           f"storage.options={json.dumps(options)}"])
    storage = Storage(job.storage.url, job.storage.options)
    storage.write_json("x.json", {"a": 1})  # a real call: the client exists, configured
    assert storage.read_json("x.json") == {"a": 1}
    conf = storage.fs.s3.meta.config
    # botocore's own form: max_attempts retries after the first call, total_max_attempts in all
    assert conf.retries == {"mode": "adaptive", "total_max_attempts": 8}
    assert (conf.connect_timeout, conf.read_timeout) == (3, 11)
    assert storage.fs.s3.meta.endpoint_url == s3_server.endpoint_url


# ---------------------------------------------------------------------------- credentials

SECRETS = {"storage.options": {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIADISTINCTKEY1",
                               "secret": "distinct-secret-2", "token": "distinct-token-3"},
           "sources.storage_options": {"key": "AKIADISTINCTKEY4", "password": "distinct-pw-5"},
           "models.storage_options": {"client_kwargs": {
               "aws_access_key_id": "AKIADISTINCTKEY6", "aws_secret_access_key": "distinct-7",
               "aws_session_token": "distinct-8"}},
           "ray.runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "distinct-9",
                                            "HF_TOKEN": "distinct-10", "OMP_NUM_THREADS": "1"}}}
SECRET_VALUES = ["AKIADISTINCTKEY1", "distinct-secret-2", "distinct-token-3", "AKIADISTINCTKEY4",
                 "distinct-pw-5", "AKIADISTINCTKEY6", "distinct-7", "distinct-8", "distinct-9",
                 "distinct-10"]


def test_print_config_masks_credentials(capsys):
    overrides = [f"{k}={json.dumps(v)}" for k, v in SECRETS.items()]
    overrides.append("models.storage_options.endpoint_url=http://user:distinct-url-pw@minio:9000")
    assert main(["run", SMOKE, "--print-config", *overrides]) == 0
    out = capsys.readouterr().out
    for value in [*SECRET_VALUES, "distinct-url-pw"]:
        assert value not in out
    shown = json.loads(out)
    assert shown["storage"]["options"] == {"endpoint_url": "http://127.0.0.1:9000", "key": MASK,
                                           "secret": MASK, "token": MASK}
    assert shown["models"]["storage_options"]["client_kwargs"] == {
        "aws_access_key_id": MASK, "aws_secret_access_key": MASK, "aws_session_token": MASK}
    assert shown["ray"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert shown["models"]["storage_options"]["endpoint_url"] == f"http://user:{MASK}@minio:9000"
    # the job itself keeps the real values (only what is shown is masked)
    job = load_job(SMOKE, overrides)
    assert job.storage.options["secret"] == "distinct-secret-2"


def test_credentials_in_an_s3_url_are_refused_without_echoing_them(capsys):
    assert main(["run", SMOKE, "--print-config",
                 "sources.uri=s3://user:distinct-url-pw@my-bucket/videos"]) == 2
    err = capsys.readouterr().err
    assert "sources.uri: credentials in an s3:// URL are not read" in err
    assert "distinct-url-pw" not in err and f"user:{MASK}@my-bucket" in err


def test_mask_secrets_masks_credential_keys_only():
    data = {"key": "k", "Secret": "s", "aws-session-token": "t", "api_key": "a",
            "sas_token": "q", "credentials": {"x": 1}, "num_tokens": 128, "keyframes": 3,
            "endpoint_url": "http://minio:9000", "token": None, "kwargs": {"password": "p"},
            "list": [{"secret": "s2"}]}
    assert mask_secrets(data) == {
        "key": MASK, "Secret": MASK, "aws-session-token": MASK, "api_key": MASK, "sas_token": MASK,
        "credentials": MASK, "num_tokens": 128, "keyframes": 3, "endpoint_url": "http://minio:9000",
        "token": None, "kwargs": {"password": MASK}, "list": [{"secret": MASK}]}
    assert data["key"] == "k"  # a copy
