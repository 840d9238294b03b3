"""`ray job submit` end to end, as a user runs it against a cluster (integration).

A real Ray head, started with the venv's own `ray` (so the job driver and the job file's shebang
`#!/usr/bin/env -S python -m pipeline run` find the venv's python first on PATH): loopback only,
its own temp dir, auth disabled, free ports, 2 CPUs. From the repository root,
`ray job submit --working-dir . -- jobs/smoke.yaml storage.url=<tmp>` must end SUCCEEDED; the
upload must hold the project and nothing git ignores; the exported model must load with
tokconv.io alone and reproduce its evaluated outputs bit for bit.

Only this head is stopped, never with `ray stop` (it kills every Ray process on the machine):
SIGTERM to the `ray start --block` process this test started, which stops the processes it
started; then SIGKILL to any survivor among the processes of its tree or of its temp dir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import JobConfig, load_job
from tokconv.io import load_converter, load_head

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "jobs/smoke.yaml"
VENV_BIN = Path(sys.executable).parent
# Ray leaves out .gitignore'd paths and .git/.venv/venv/__pycache__, but not paths ignored only
# through .git/info/exclude, like the engineers' worktrees under .wt/ in the main checkout
EXCLUDES = [".wt/"]
SUBMIT_TIMEOUT_S = 1200
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def model_name(job: JobConfig) -> str:
    """The exported model's name (the job-level ``model_name``)."""
    return job.model_name


# ------------------------------------------------------------- our head's processes, from /proc


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), fields[19]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st:
            children.setdefault(st[1], []).append(pid)
    out, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _using(path: Path) -> set[int]:
    """Processes whose command line names ``path`` (our head's temp dir: unique to this test)."""
    out = set()
    for pid in _pids():
        try:
            cmdline = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if str(path) in cmdline and pid != os.getpid():
            out.add(pid)
    return out


def _alive(procs: dict[int, str]) -> dict[int, str]:
    """The members of {pid: start time} still running (the start time guards against pid reuse)."""
    return {
        pid: t for pid, t in procs.items() if (st := _stat(pid)) and st[0] != "Z" and st[2] == t
    }


def _snapshot(pids: set[int]) -> dict[int, str]:
    return {pid: st[2] for pid in pids if (st := _stat(pid))}


def stop_head(proc: subprocess.Popen, temp: Path) -> dict[int, str]:
    """Stop the head started as ``proc`` with ``--temp-dir temp``, and only it; returns the
    processes that outlived SIGTERM and got SIGKILL."""
    ours = _snapshot(_tree(proc.pid) | _using(temp))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while (left := _alive(ours | _snapshot(_using(temp)))) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


# ------------------------------------------------------------------ the head


@dataclass
class Head:
    address: str  # the dashboard's job API
    env: dict[str, str]  # what `ray` commands against it run with
    temp: Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rj")
    # Ray's unix sockets live in <temp>/session_<date>_<time>_<us>_<pid>/sockets/: 107 bytes at most
    if len(f"{temp}/session_2026-12-02_05-56-00_532368_1234567/sockets/plasma_store") > 107:
        pytest.fail(f"temp dir {temp} is too long for Ray's socket paths; set --basetemp shorter")
    gcs, dashboard, client, agent = _free_ports(4)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # single-node: the node IP is loopback (else Ray picks this host's address)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stopped after its job: nothing to drain
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=600000000",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    log = temp / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(f"http://127.0.0.1:{dashboard}", env, temp)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the head's job API did not come up in 180 s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(1)
        yield head
    finally:
        stop_head(proc, temp)
    left = _alive(_snapshot(_using(temp)))  # proc.pid is reaped by now: it may be reused
    assert not left, f"processes of the test's head outlived it: {sorted(left)}"


# ------------------------------------------------------------------ the test


def _uploaded_package(temp: Path) -> Path:
    unpacked = temp / "session_latest" / "runtime_resources" / "working_dir_files"
    pkgs = [p for p in sorted(unpacked.glob("_ray_pkg_*")) if p.is_dir()]
    assert len(pkgs) == 1, f"expected one unpacked working dir, found {pkgs}"
    return pkgs[0]


@pytest.mark.timeout(SUBMIT_TIMEOUT_S + 300)
def test_ray_job_submit_runs_the_smoke_job_and_exports_a_loadable_model(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    store = tmp_path / "store"
    overrides = [f"storage.url={store}", "train.epochs=1"]
    job = load_job(ROOT / SMOKE, overrides)
    submission = f"smoke-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--submission-id",
        submission,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        SMOKE,
        *overrides,
    ]
    client = JobSubmissionClient(ray_head.address)
    try:
        run = subprocess.run(
            cmd,
            check=False,
            cwd=ROOT,
            env=ray_head.env,
            capture_output=True,
            text=True,
            timeout=SUBMIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        client.stop_job(submission)
        pytest.fail(
            f"not finished in {SUBMIT_TIMEOUT_S} s; the job's log:\n"
            f"{client.get_job_logs(submission)[-8000:]}"
        )
    status = client.get_job_status(submission)
    assert run.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"`ray job submit` exited {run.returncode}, job {status}:\n"
        f"{run.stdout[-8000:]}\n{run.stderr[-4000:]}"
    )

    # the upload: the project, executable job files, nothing git ignores
    pkg = _uploaded_package(ray_head.temp)
    uploaded = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()}
    tracked = set(
        subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        .stdout.strip("\0")
        .split("\0")
    )
    tracked = {f for f in tracked if (ROOT / f).is_file()}  # minus files deleted in the worktree
    assert tracked <= uploaded, sorted(tracked - uploaded)[:10]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        check=False,  # exits 1 when nothing is ignored
        cwd=ROOT,
        text=True,
        input="\n".join(sorted(uploaded)),
        capture_output=True,
    ).stdout.split()
    assert ignored == [], f"uploaded, though git ignores them: {ignored[:10]}"
    assert os.access(pkg / SMOKE, os.X_OK)

    # the run, and its model as a consumer sees it
    summary = json.loads((store / "runs" / job.name / "summary.json").read_text())
    assert set(summary["stages"]) == {"extract", "train", "evaluate", "export"}
    assert summary["stages"]["extract"]["failed"] == 0
    models = store / "models" / model_name(job)
    latest = json.loads((models / "latest.json").read_text())
    version = models / latest["version"]
    assert {
        "model.safetensors",
        "config.json",
        "head.safetensors",
        "head.json",
        "metrics.json",
        "standardization.safetensors",
        "reference_io.safetensors",
    } <= {p.name for p in version.iterdir()}
    converter, head = load_converter(version), load_head(version)
    ref = load_file(version / "reference_io.safetensors")
    with torch.no_grad():
        outs = converter.forward_all(ref["student"])
        logits = head(ref["student"], outs)
    assert set(outs) == {"videomae", "timesformer", "vivit"}
    for target, out in outs.items():
        assert torch.equal(out, ref[f"out.{target}"]), target
    assert torch.equal(logits, ref["logits"])
