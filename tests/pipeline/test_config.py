"""Config validation: every job file validates; a wrong key or value fails naming the key."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.__main__ import _parse_stages, main
from pipeline.config import ConfigError, JobConfig, apply_overrides, load_job

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job_file", JOBS, ids=lambda p: p.name)
def test_job_files_validate_and_are_executable(job_file):
    job = load_job(job_file)
    assert isinstance(job, JobConfig)
    assert job_file.read_text().startswith("#!/usr/bin/env -S python -m pipeline run\n")
    assert job_file.stat().st_mode & stat.S_IXUSR, f"{job_file} lacks its run bit"


def test_overrides_are_parsed_as_yaml_and_nested():
    job = load_job(JOBS[0], ["train.epochs=7", "train.optim.lr=1e-4", "sources.limit=3",
                             "models.compile=[student, vivit]", "storage.options.anon=false"])
    assert job.train.epochs == 7
    assert job.train.optim.lr == pytest.approx(1e-4)
    assert job.sources.limit == 3
    assert job.models.compile == ["student", "vivit"]
    assert job.storage.options == {"anon": False}


@pytest.mark.parametrize("override, key", [
    ("decode.windw=3", "decode.windw"),
    ("decode.window=0", "decode.window"),
    ("extract.batch_size=many", "extract.batch_size"),
    ("train.converter=no_such_converter", "train.converter"),
    ("train.deficiency.mask_ratio=1.5", "train.deficiency.mask_ratio"),
    ("models.weights=sideways", "models.weights"),
    ("bogus=1", "bogus"),
])
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_job(JOBS[0], [override])
    assert f"  {key}:" in str(err.value)


def test_unknown_converter_lists_known_ones():
    with pytest.raises(ConfigError, match="baseline_interp_linear"):
        load_job(None, ["train.converter=nope"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs: 'train' is not a mapping|not a mapping"):
        apply_overrides({"train": 3}, ["train.epochs=2"])
    with pytest.raises(ConfigError, match="job file not found"):
        load_job("jobs/does-not-exist.yaml")


def test_stages_subset_keeps_pipeline_order_and_rejects_unknown():
    assert _parse_stages("train,extract") == ["extract", "train"]
    with pytest.raises(ConfigError, match="unknown stage"):
        _parse_stages("extract,deploy")


def test_cli_fails_fast_with_exit_2_naming_the_key(capsys):
    assert main(["run", str(JOBS[0]), "decode.stride=-2"]) == 2
    assert "decode.stride" in capsys.readouterr().err


def test_job_file_runs_through_its_shebang(tmp_path):
    """`jobs/smoke.yaml --print-config` is executable directly (as `ray job submit` runs it)."""
    # this checkout's pipeline package, not whichever one is installed
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=str(Path(__file__).parents[2]))
    out = subprocess.run([str(JOBS[-1].resolve()), "--print-config", "train.epochs=5"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert '"epochs": 5' in out.stdout


@pytest.mark.parametrize("override, old, new", [
    ("extract.store=feat", "extract.store", "store"),
    ("export.model_name=m", "export.model_name", "model_name"),
])
def test_moved_keys_fail_naming_where_they_went(override, old, new):
    with pytest.raises(ConfigError) as err:
        load_job(JOBS[0], [override])
    assert f"  {old}: moved to {new}" in str(err.value)
    job = load_job(JOBS[0], [f"{new}=renamed"])
    assert getattr(job, new) == "renamed"


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _fields(sub, f"{prefix}{name}.")


FIELDS = dict(_fields(JobConfig))


@pytest.mark.parametrize("key", FIELDS)
def test_every_field_has_a_one_line_description(key):
    """What, unit, default in one line; measurements belong in bench/RESULTS.md."""
    text = FIELDS[key].description
    assert text, f"{key} has no description"
    assert "\n" not in text and len(text) <= 120, f"{key}: {len(text)} characters"
    assert not re.search(r"measured|RESULTS|clips/s|\d+(\.\d+)? ?(ms|GB|MB|s)\b", text), (key, text)


def test_model_storage_options_reach_the_model_sources(s3_server, tmp_path):
    """models.storage_options, not sources.storage_options, is what reads s3:// model sources."""
    from pipeline.backbones import MODEL_NAMES, tiny_configs
    from pipeline.extract import model_specs
    bucket = s3_server.make_bucket("models")
    for name, conf in tiny_configs().items():
        conf.save_pretrained(str(tmp_path / name))
        s3_server.upload(tmp_path / name, f"s3://{bucket}/{name}")
    good = s3_server.storage_options
    dead = {**good, "endpoint_url": "http://127.0.0.1:9",  # nothing listens there
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    sources = [f"models.{n}.source=s3://{bucket}/{n}" for n in MODEL_NAMES]
    job = load_job(None, [*sources, "models.weights=pretrained"])
    job.sources.storage_options = good
    job.models.storage_options = dead
    with pytest.raises(Exception, match="127.0.0.1:9"):
        model_specs(job.models)
    job.models.storage_options = good
    tiny = model_specs(job.models.model_copy(update={"weights": "tiny"}))
    assert model_specs(job.models) == tiny
