"""The deployment files under infra/, checked without a cluster (fast unit tests).

* every YAML file parses, all its documents, duplicate keys refused (kubectl decodes strictly);
* KubeRay objects use only the fields the KubeRay v1.6.2 CRDs define along the schema types we use
  (crd_table.CRD_FIELDS / CHILDREN), required fields present, values of the CRD's types, and keep
  the operator's own rules (validation.go v1.6.2, in manifest_checks);
* entrypoints name executable job files in jobs/ whose overrides validate (pipeline.config);
* the image: pyproject.toml is its source (``<name>:<version>``); the Dockerfile's build line and
  every Ray container use it; the Ray version agrees across the Dockerfile's base image,
  pyproject's pin and every rayVersion; every other image is pinned;
* cron schedules are valid 5-field expressions and two ticks' runs cannot overlap;
* Secrets are referenced (envFrom secretRef / secretKeyRef), never inlined: infra/ ships no
  Secret (the dev MinIO's credentials are created with kubectl, infra/README.md), and every
  Secret referenced is one the README tells how to create.
The ``*_rejects_*`` tests feed each check a broken manifest (issue 17's findings among them).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
import subprocess
import tomllib

import pytest
import yaml
from manifest_checks import (
    ACCESS_KEY_LITERAL,
    ROOT,
    check_entrypoint,
    check_kuberay,
    containers,
    image_problems,
    load_docs,
    min_period,
    parse_cron,
    secret_problems,
    secret_refs,
)

from pipeline.config import load_job

INFRA = ROOT / "infra"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def _parse(path):
    try:
        return load_docs(path.read_text())
    except yaml.YAMLError as e:  # test_every_yaml_file_parses reports it; the other checks go on
        return e


PARSED = {p: _parse(p) for p in YAML_FILES}
DOCS = {p: d for p, d in PARSED.items() if isinstance(d, list)}
OBJECTS = [(p, d) for p, docs in DOCS.items() for d in docs if isinstance(d, dict) and "kind" in d]
KUBERAY = [(p, d) for p, d in OBJECTS if d["kind"] in ("RayCluster", "RayJob", "RayCronJob")]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"{PYPROJECT['name']}:{PYPROJECT['version']}"
RAY_CONTAINERS = ("ray-head", "ray-worker")


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in OBJECTS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} under infra/, found {len(found)}"
    return found[0]


def _ids(pairs) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{d['kind']}/{d['metadata']['name']}" for p, d in pairs]


def _job_specs() -> list[tuple[str, dict]]:
    """(where, RayJobSpec) of every RayJob and RayCronJob jobTemplate."""
    return [
        (
            f"{d['kind']}/{d['metadata']['name']}",
            d["spec"] if d["kind"] == "RayJob" else d["spec"]["jobTemplate"],
        )
        for _, d in KUBERAY
        if d["kind"] != "RayCluster"
    ]


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(ROOT)) for p in YAML_FILES])
def test_every_yaml_file_parses(path):
    docs = PARSED[path]
    if isinstance(docs, yaml.YAMLError):
        pytest.fail(f"{path.relative_to(ROOT)} is not valid YAML: {docs}")
    assert docs and all(isinstance(d, dict) for d in docs), (
        f"{path}: every document must be a mapping"
    )
    for d in docs:
        if "kind" in d or "apiVersion" in d:
            assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d


def test_infra_holds_the_deployment():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in OBJECTS}
    assert {
        ("RayCluster", "tokconv"),
        ("RayJob", "tokconv-full"),
        ("RayJob", "tokconv-smoke"),
        ("RayCronJob", "tokconv-nightly"),
        ("CronJob", "tokconv-nightly"),
        ("Deployment", "minio"),
        ("Service", "minio"),
    } <= kinds
    assert (INFRA / "README.md").is_file() and (INFRA / "docker" / "Dockerfile").is_file()


def test_yaml_check_rejects_todays_cronjob_line_40_and_duplicate_keys():
    # infra/k8s/cronjob.yaml before issue 17: a plain scalar holding ": "
    line_40 = (
        'args:\n  - sed "s/name: tokconv-full/name: tokconv-full-$(date +%Y%m%d%H%M)/" '
        "/spec/rayjob.yaml | kubectl create -f -\n"
    )
    with pytest.raises(yaml.YAMLError, match="mapping values are not allowed"):
        load_docs(line_40)
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        load_docs("spec:\n  schedule: '0 2 * * *'\n  schedule: '0 3 * * *'\n")


# ------------------------------------------------------------------ KubeRay fields and rules


@pytest.mark.parametrize("doc", [d for _, d in KUBERAY], ids=_ids(KUBERAY))
def test_kuberay_objects_use_only_v1_6_fields_and_keep_the_operators_rules(doc):
    assert check_kuberay(doc) == []


def test_kuberay_check_rejects_todays_raycronjob_fields():
    cron = copy.deepcopy(_one("RayCronJob", "tokconv-nightly"))
    cron["spec"].update(timeZone="Etc/UTC", concurrencyPolicy="Forbid")  # infra/ before issue 17
    errors = check_kuberay(cron)
    assert any("spec.timeZone: not a field of RayCronJobSpec" in e for e in errors), errors
    assert any("spec.concurrencyPolicy: not a field of RayCronJobSpec" in e for e in errors), errors


def _head(spec: dict) -> dict:
    return spec["rayClusterSpec"]["headGroupSpec"]


def _head_container(spec: dict) -> dict:
    return _head(spec)["template"]["spec"]["containers"][0]


def _worker(spec: dict) -> dict:
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]


def test_kuberay_check_rejects_typos_wrong_types_and_broken_rules():
    cases = {  # expected error -> how to break rayjob.yaml's spec
        "envfrom: not a field of Container": lambda s: _head_container(s).update(envfrom=[]),
        "minReplicas: required by WorkerGroupSpec": lambda s: _worker(s).pop("minReplicas"),
        "is not of CRD type m": lambda s: _head(s)["rayStartParams"].update({"num-gpus": 0}),
        "is not of CRD type Q": lambda s: _head_container(s)["resources"]["limits"].update(
            memory="32GB"
        ),
        "is not of CRD type i": lambda s: s.update(backoffLimit="1"),
        "submissionMode": lambda s: s.update(submissionMode="K8sMode"),
        "ttlSecondsAfterFinished needs shutdownAfterJobFinishes": lambda s: s.update(
            shutdownAfterJobFinishes=False
        ),
        "minReplicas <= replicas <= maxReplicas": lambda s: _worker(s).update(replicas=9),
        "resources in both rayStartParams and resources": lambda s: _head(s).update(
            resources={"CPU": "8"}
        ),
    }
    job = _one("RayJob", "tokconv-full")
    for expected, edit in cases.items():
        broken = copy.deepcopy(job)
        edit(broken["spec"])
        errors = check_kuberay(broken)
        assert any(expected in e for e in errors), (expected, errors)
    broken = copy.deepcopy(job)
    broken["metadata"]["name"] = "tokconv-full-" + "x" * 40
    assert "at most 47 characters" in check_kuberay(broken)[0]


def test_raycronjob_template_is_the_rayjob_spec():
    # one job, two schedulers: the CronJob fallback creates RayJobs from rayjob.yaml itself
    assert (
        _one("RayCronJob", "tokconv-nightly")["spec"]["jobTemplate"]
        == _one("RayJob", "tokconv-full")["spec"]
    )


def test_operator_values_enable_the_raycronjob_gate():
    values = DOCS[INFRA / "kuberay" / "operator-values.yaml"][0]
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]


# ------------------------------------------------------------------ entrypoints and capacity


@pytest.mark.parametrize("where,spec", _job_specs(), ids=[w for w, _ in _job_specs()])
def test_entrypoints_run_executable_job_files_whose_overrides_validate(where, spec):
    assert check_entrypoint(spec["entrypoint"]) == []


def test_entrypoint_check_rejects_missing_files_and_bad_overrides():
    assert "not a job file in jobs/" in check_entrypoint("jobs/nope.yaml")[0]
    assert "python" in check_entrypoint("python -m pipeline run jobs/full.yaml")[0]
    assert "train.epochz" in check_entrypoint("jobs/smoke.yaml train.epochz=3")[0]


@pytest.mark.parametrize("where,spec", _job_specs(), ids=[w for w, _ in _job_specs()])
def test_job_clusters_hold_what_the_job_asks_for(where, spec):
    # a Ray Train request the cluster can never hold never ends (issue 17): checked statically here
    job_file, *overrides = spec["entrypoint"].split()
    train = load_job(ROOT / job_file, overrides).train
    groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
    gpus = sum(
        g["maxReplicas"] * int(lim.get("nvidia.com/gpu", 0)) for g, lim in zip(groups, limits)
    )
    if train.use_gpu:
        # num_workers=auto takes one worker per GPU of the autoscaler's maximum
        # (pipeline.train.resolve_num_workers), so the cluster must offer at least one
        assert gpus >= 1, f"{where}: a GPU job on a cluster with no GPUs"
        if train.num_workers != "auto":
            assert 1 <= train.num_workers <= gpus, (
                f"{where}: {train.num_workers} GPU workers, {gpus} GPUs")
        assert all(
            train.cpus_per_worker <= int(lim["cpu"]) for lim in limits if "nvidia.com/gpu" in lim
        )
    if not train.use_gpu:
        assert gpus == 0, f"{where}: a CPU job on a cluster with {gpus} GPUs"


# ------------------------------------------------------------------ images


def test_ray_containers_run_the_projects_image_and_one_ray_version():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"-t {IMAGE} " in dockerfile, f"the Dockerfile's build line must tag {IMAGE}"
    ray_pin = re.search(r'"ray\[[^]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-", dockerfile, re.MULTILINE).group(1)
    assert base == ray_pin
    ray_images, versions = set(), set()
    for _, d in KUBERAY:
        ray_images |= {c["image"] for c in containers(d) if c["name"] in RAY_CONTAINERS}
        versions |= {n["rayVersion"] for n in _dicts_with(d, "rayVersion")}
    assert ray_images == {IMAGE} and versions == {ray_pin}


def _dicts_with(node, key):
    if isinstance(node, dict):
        if key in node:
            yield node
        for v in node.values():
            yield from _dicts_with(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _dicts_with(v, key)


def test_every_image_is_pinned():
    images = {c["image"] for _, d in OBJECTS for c in containers(d)}
    assert {"busybox:1.37", "registry.k8s.io/kubectl:v1.32.3"} <= images
    assert [p for i in sorted(images) for p in image_problems(i)] == []
    assert image_problems("minio/minio:latest")  # infra/k8s/minio-dev.yaml before issue 17
    assert image_problems("tokconv-pipeline") and image_problems("localhost:5000/tokconv-pipeline")


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("where", ["RayCronJob", "CronJob"])
def test_schedules_are_valid_and_runs_of_two_ticks_never_overlap(where):
    # the RayCronJob runs its jobTemplate; the CronJob fallback runs rayjob.yaml (its ConfigMap)
    cron = _one(where, "tokconv-nightly")
    schedule = cron["spec"]["schedule"]
    spec = (
        cron["spec"]["jobTemplate"]
        if where == "RayCronJob"
        else _one("RayJob", "tokconv-full")["spec"]
    )
    parse_cron(schedule)
    # each attempt is bounded by activeDeadlineSeconds (StartTime is reset per retry; a
    # DeadlineExceeded failure is not retried: rayjob_controller.go v1.6.2)
    worst = dt.timedelta(seconds=(spec.get("backoffLimit", 0) + 1) * spec["activeDeadlineSeconds"])
    assert worst < min_period(schedule), (
        f"{where}: a run may last {worst}, ticks come every {min_period(schedule)}"
    )


@pytest.mark.parametrize(
    "expr",
    [
        "@daily",
        "0 2 * *",
        "60 * * * *",
        "0 2 * * 7",
        "*/0 * * * *",
        "5-1 * * * *",
        "CRON_TZ=UTC 0 2 * * *",
        "0 2 * * SUNDAY",
    ],
)
def test_cron_check_rejects(expr):
    with pytest.raises(ValueError, match="cron|day of week"):
        parse_cron(expr)


def test_cron_periods():
    assert min_period("0 2 * * *") == dt.timedelta(days=1)
    assert min_period("*/15 0-6 * * MON-FRI", days=14) == dt.timedelta(minutes=15)
    assert min_period("0 2 1 * *") == dt.timedelta(days=28)  # February 2027
    assert min_period("0 3 1 * 1", days=60) == dt.timedelta(days=3)  # day of month OR Monday


def test_cronjob_fallback_creates_one_rayjob_name_per_tick(tmp_path):
    cron = _one("CronJob", "tokconv-nightly")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (init,), (create,) = pod["initContainers"], pod["containers"]
    assert create["command"] == ["kubectl", "create", "-k", "/work"]
    assert {"name": "spec", "configMap": {"name": "tokconv-rayjob"}} in pod["volumes"]
    assert "--from-file=rayjob.yaml=infra/kuberay/rayjob.yaml" in (INFRA / "README.md").read_text()
    # run the init container's script (paths of its mounts mapped into tmp_path) as its pod would
    script = init["args"][0]
    for mount in init["volumeMounts"]:
        (tmp_path / mount["name"]).mkdir()
        script = script.replace(mount["mountPath"] + "/", f"{tmp_path / mount['name']}/")
    (tmp_path / "spec" / "rayjob.yaml").write_text((INFRA / "kuberay" / "rayjob.yaml").read_text())

    def rayjob_name(job_name: str) -> str:
        subprocess.run(
            ["sh", "-c", script],
            env={"JOB_NAME": job_name, "PATH": os.environ["PATH"]},
            check=True,
            timeout=30,
        )
        kustomization = yaml.safe_load((tmp_path / "work" / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["rayjob.yaml"]
        assert isinstance(kustomization["nameSuffix"], str)  # unquoted, -29412345 reads as a number
        rayjob = load_docs((tmp_path / "work" / "rayjob.yaml").read_text())[0]
        return rayjob["metadata"]["name"] + kustomization["nameSuffix"]

    # the CronJob controller names a tick's Job <cronjob>-<scheduled time in minutes>
    tick = int(dt.datetime(2027, 1, 1, 2, tzinfo=dt.UTC).timestamp() // 60)
    first = rayjob_name(f"tokconv-nightly-{tick}")
    assert first == f"tokconv-full-{tick}" and rayjob_name(f"tokconv-nightly-{tick}") == first
    assert rayjob_name(f"tokconv-nightly-{tick + 1440}") != first
    renamed = copy.deepcopy(_one("RayJob", "tokconv-full"))
    renamed["metadata"]["name"] = f"tokconv-full-{10**10 - 1}"  # the longest minute suffix
    assert check_kuberay(renamed) == []


# ------------------------------------------------------------------ secrets


def test_secrets_are_referenced_never_inlined():
    readme = (INFRA / "README.md").read_text()
    refs = set()
    for path, d in OBJECTS:
        assert secret_problems(d) == [], path
        refs |= secret_refs(d)
    assert refs == {"tokconv-s3", "tokconv-minio"}
    for name in refs:
        assert f"kubectl create secret generic {name}" in readme, (
            f"README must say how to create {name}"
        )
    for path in [*YAML_FILES, INFRA / "docker" / "Dockerfile", INFRA / "README.md"]:
        assert not ACCESS_KEY_LITERAL.search(path.read_text()), f"{path}: an access key literal"


def test_secret_check_rejects_inlined_secrets():
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "tokconv-s3"},
        "stringData": {"AWS_SECRET_ACCESS_KEY": "x"},
    }
    assert secret_problems(secret)
    job = copy.deepcopy(_one("RayJob", "tokconv-full"))
    _head_container(job["spec"])["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]
    assert secret_problems(job) == ["RayJob: env AWS_SECRET_ACCESS_KEY has a literal value"]
    assert ACCESS_KEY_LITERAL.search("key: AKIAIOSFODNN7EXAMPLE")
