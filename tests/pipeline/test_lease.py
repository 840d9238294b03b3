"""Leases in storage (pipeline.lease), on a local directory and on a real S3 endpoint (moto's
server on 127.0.0.1): exclusive creates, one holder at a time, all-or-none for a job's three
leases, heartbeats, expiry after a crash (a holder SIGKILLed from outside), take-over of a holder
stalled past its expiry (SIGSTOP from outside), waiting, and a held job skipped by the CLI.

The lease races between processes run on the local directory. On S3, moto's server honours
``If-None-Match: *`` (412 for an existing key) and 8 clients racing on 60 keys win each exactly
once, though moto checks and stores without a lock (AWS makes it atomic); the 409 conflict AWS
answers to concurrent conditional writes comes from a proxy in front of moto. Two CLI copies
start together on S3 in test_schedule.py.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tiny_features import make_tiny_store, publish_checkpoint

from pipeline.__main__ import main
from pipeline.config import ConfigError, load_job
from pipeline.lease import JobLease, Lease, LeaseLost
from pipeline.storage import Storage, create_exclusive, replace_atomic

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "jobs/smoke.yaml"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3_server")
    return Storage(f"s3://{s3.make_bucket('lease')}/root", s3.storage_options)


def _lease(storage, job="j", store="s", model="m", ttl_s=600.0) -> JobLease:
    return JobLease(storage, job_name=job, store=store, model_name=model, ttl_s=ttl_s)


def _records(storage, name) -> dict[str, dict]:
    rel = f"leases/{name}"
    storage.fs.invalidate_cache(storage.path(rel))
    return {n: storage.read_json(f"{rel}/{n}") for n in storage.ls(rel) if n.endswith(".json")}


# ----------------------------------------------------------------------- the storage helpers

def test_create_exclusive_creates_once_and_replace_overwrites(storage):
    assert create_exclusive(storage, "x/a.json", b"first")
    assert not create_exclusive(storage, "x/a.json", b"second")
    assert storage.read_bytes("x/a.json") == b"first"
    replace_atomic(storage, "x/a.json", b"third")
    assert storage.read_bytes("x/a.json") == b"third"
    assert storage.ls("x") == ["a.json"]  # no temporary files left behind


# ------------------------------------------------------------------------------ one holder

def test_one_holder_until_released_then_the_next_epoch(storage):
    a, b = _lease(storage), _lease(storage)
    assert a.acquire() is None
    held = b.acquire()
    assert held is not None and held.owner == a.owner and held.job == "j"
    assert held.url == storage.url("leases/job-j")
    assert f"held by {a.owner} (job j) until {held.expires}" in held.reason()
    rec = _records(storage, "job-j")["00000000.json"]
    assert rec["owner"] == a.owner and not rec["released"]
    assert rec["expires_unix"] == pytest.approx(time.time() + 600, abs=30)
    a.release()
    assert _records(storage, "job-j")["00000000.json"]["released"]
    assert b.acquire() is None
    for name in ("job-j", "store-s", "model-m"):
        recs = _records(storage, name)
        assert sorted(recs) == ["00000000.json", "00000001.json"], name
        assert recs["00000001.json"]["owner"] == b.owner
    b.release()
    c = _lease(storage)
    assert c.acquire() is None  # epoch 2; epoch 0 is cleaned up, the previous one kept
    assert sorted(_records(storage, "job-j")) == ["00000001.json", "00000002.json"]
    c.release()


def test_a_job_takes_all_three_leases_or_none(storage):
    """Another job sharing the store is kept out, and keeps none of the leases it took first."""
    a = _lease(storage, job="a", store="shared", model="ma")
    assert a.acquire() is None
    b = _lease(storage, job="b", store="shared", model="mb")
    held = b.acquire()
    assert held.url == storage.url("leases/store-shared") and held.owner == a.owner
    assert _records(storage, "job-b")["00000000.json"]["released"]  # taken, then given back
    assert "model-mb" not in storage.ls("leases")  # never reached
    other = _lease(storage, job="c", store="own", model="mc")  # nothing shared: proceeds
    assert other.acquire() is None
    other.release()
    a.release()


def test_a_retried_create_that_had_succeeded_is_ours(storage):
    """botocore retries a PUT whose reply was lost; the retry's 412 must not lock us out."""
    lease = Lease(storage, "job-r", owner="me", job="r", ttl_s=60)
    assert lease.acquire() is None
    again = Lease(storage, "job-r", owner="me", job="r", ttl_s=60)
    assert again.acquire() is None and again.epoch == 0


def test_an_expired_lease_is_taken_over(storage):
    """A crashed run's record (expiry in the past) does not block the next run."""
    stale = {"owner": "crashed:1:dead", "job": "j", "epoch": 4, "released": False,
             "expires": "2026-12-01T00:00:00Z", "expires_unix": time.time() - 60}
    storage.write_json("leases/job-j/00000004.json", stale)
    lease = _lease(storage)
    assert lease.acquire() is None
    assert lease.leases[0].epoch == 5 and lease.leases[0].took_over["owner"] == "crashed:1:dead"
    lease.release()


def test_the_heartbeat_keeps_a_live_lease(storage):
    # ttl 4 s, renewed every 1.3 s: slack for a loaded 2-core host (1.5 s was flaky on S3)
    a = _lease(storage, ttl_s=4.0)
    assert a.acquire() is None
    first = _records(storage, "job-j")["00000000.json"]["expires_unix"]
    try:
        for _ in range(4):  # 8 s: twice the expiry
            time.sleep(2.0)
            held = _lease(storage, ttl_s=4.0).acquire()
            assert held is not None and held.owner == a.owner
        assert _records(storage, "job-j")["00000000.json"]["expires_unix"] > first + 4.0
        a.check("the next stage")
    finally:
        a.release()


def test_waiting_for_a_lease_the_holder_releases(storage):
    a = _lease(storage, ttl_s=60)
    assert a.acquire() is None
    waiter = subprocess.Popen([sys.executable, "-c", _CHILD, storage.root_url,
                               json.dumps(storage.options), "60", "wait=20"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    time.sleep(2.0)
    assert waiter.poll() is None  # still waiting
    a.release()
    out, _ = waiter.communicate(timeout=60)
    assert "took" in out, out
    assert _records(storage, "job-j")["00000001.json"]["released"]  # the waiter's, released


# --------------------------------------------------------------- faults from outside: processes

# a holder in its own process: take the job's leases, say so, then hold them (checking them
# like run_job does between stages) until killed or until the lease is found lost
_CHILD = textwrap.dedent("""
    import json, sys, time
    from pipeline.lease import JobLease, LeaseLost, check_held
    from pipeline.storage import Storage
    url, options, ttl = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    args = dict(a.split("=", 1) for a in sys.argv[4:])
    if "start_at" in args:
        time.sleep(max(0.0, float(args["start_at"]) - time.time()))
    lease = JobLease(Storage(url, options), job_name="j", store="s", model_name="m", ttl_s=ttl)
    held = lease.acquire(wait_s=float(args.get("wait", 0)))
    print(f"held by {held.owner}" if held else f"took {lease.owner}", flush=True)
    if held:
        sys.exit(0)
    if args.get("then") != "hold":
        lease.release()
        sys.exit(0)
    while True:
        time.sleep(0.1)
        try:
            check_held("moving latest")
        except LeaseLost as e:
            print(f"lost: {e}", flush=True)
            sys.exit(3)
""")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _holder(storage, ttl_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, storage.root_url,
                             json.dumps(storage.options), str(ttl_s), "then=hold"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("took "), line
    return proc, line.split()[1]


def test_a_killed_holders_lease_expires_and_the_next_run_takes_it_over(storage, capsys):
    proc, owner = _holder(storage, ttl_s=2.0)
    proc.send_signal(signal.SIGKILL)  # a crash: no release, no more heartbeats
    proc.wait()
    killed_at = time.time()
    held = _lease(storage).acquire()
    assert held is not None and held.owner == owner  # not expired yet
    expires = _records(storage, "job-j")["00000000.json"]["expires_unix"]
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    assert time.time() - killed_at < 5  # expired within ttl_s (plus a heartbeat) of the crash
    lease = _lease(storage)
    assert lease.acquire() is None
    assert f"[lease] took over {storage.url('leases/job-j')}: {owner}" in capsys.readouterr().out
    lease.release()


def test_a_stalled_holder_taken_over_finds_out_and_stops(storage):
    """SIGSTOP the holder past its expiry: the next run takes over; on SIGCONT the holder's
    heartbeat finds a later epoch and check_held (what export calls before moving latest)
    raises LeaseLost."""
    proc, _ = _holder(storage, ttl_s=1.5)
    proc.send_signal(signal.SIGSTOP)
    try:
        expires = _records(storage, "job-j")["00000000.json"]["expires_unix"]
        time.sleep(max(0.0, expires - time.time()) + 0.2)
        taker = _lease(storage, ttl_s=60)
        assert taker.acquire() is None
    finally:
        proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert "lost: lease " in out and "was taken over" in out and "moving latest" in out, out
    # the stalled holder left the taker's lease alone
    recs = _records(storage, "job-j")
    assert recs["00000001.json"]["owner"] == taker.owner and not recs["00000001.json"]["released"]
    taker.check("the next stage")
    taker.release()


def test_racing_processes_exactly_one_takes_the_lease(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    start_at = time.time() + 3.0  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, storage.root_url, "{}", "60",
                               f"start_at={start_at}", "then=hold"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    try:
        lines = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    took = [ln.split()[1] for ln in lines if ln.startswith("took ")]
    assert len(took) == 1, lines
    assert sorted(lines) == sorted([f"took {took[0]}"] + [f"held by {took[0]}"] * 5), lines
    assert sorted(_records(storage, "job-j")) == ["00000000.json"]
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


_CREATOR = textwrap.dedent("""
    import sys, time
    from pipeline.storage import Storage, create_exclusive
    storage, start_at, me = Storage(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    time.sleep(max(0.0, start_at - time.time()))
    won = [i for i in range(1000) if create_exclusive(storage, f"race/{i}.json", me.encode())]
    print(" ".join(map(str, won)))
""")


def test_racing_exclusive_creates_have_one_winner_each(tmp_path):
    """4 processes create the same 1000 names in the same order at the same time."""
    root = tmp_path / "root"
    start_at = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", _CREATOR, str(root), str(start_at), f"p{i}"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    wins = [[int(w) for w in p.communicate(timeout=120)[0].split()] for p in procs]
    assert sorted(w for ws in wins for w in ws) == list(range(1000))  # each name won exactly once
    storage = Storage(str(root))
    for i, ws in enumerate(wins):
        assert all(storage.read_bytes(f"race/{w}.json") == f"p{i}".encode() for w in ws)
    assert sum(1 for ws in wins if ws) > 1, "no race happened: one process won every name"


def test_lost_check_raises_for_a_taken_over_lease(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    a = Lease(storage, "job-x", owner="a", job="x", ttl_s=60)
    assert a.acquire() is None
    storage.write_json("leases/job-x/00000001.json", {"owner": "b", "released": False,
                                                      "expires": "later",
                                                      "expires_unix": time.time() + 60})
    assert a.lost()
    with pytest.raises(LeaseLost, match="was taken over"):
        a.renew()
    a.release()  # a lost lease is left alone
    assert storage.read_json("leases/job-x/00000001.json")["owner"] == "b"


# ---------------------------------------------------------------------------- the CLI

def test_a_job_whose_lease_is_held_is_skipped_with_exit_0(tmp_path, capsys):
    """evaluate (no Ray) on a tiny real store: held -> skipped, nothing written but
    skipped.json; lease.enabled=false -> runs anyway; released -> runs under its own leases."""
    url = str(tmp_path / "root")
    storage = Storage(url)
    args = ["run", SMOKE, "--stages", "evaluate", f"storage.url={url}",
            "evaluate.report_html=false"]
    make_tiny_store(storage)
    publish_checkpoint(storage, load_job(SMOKE, args[4:]))
    holder = _lease(storage, job="smoke", store="features", model="tokconv-smoke")
    assert holder.acquire() is None
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        line = (f"[lease] skipped: lease {storage.url('leases/job-smoke')} held by "
                f"{holder.owner} (job smoke) until ")
        assert line in out, out
        assert "=== [1/" not in out  # no stage started
        skipped = storage.read_json("runs/smoke/skipped.json")
        assert skipped["holder"] == holder.owner and skipped["skipped"].startswith("skipped: ")
        assert not storage.exists("runs/smoke/summary.json")
        assert not storage.exists("runs/smoke/eval")
        assert main([*args, "lease.enabled=false"]) == 0  # nothing guards this run
        assert storage.exists("runs/smoke/eval/metrics.json")
        assert storage.read_json("runs/smoke/summary.json")["leases"] is None
    finally:
        holder.release()
    assert main(args) == 0
    summary = storage.read_json("runs/smoke/summary.json")
    assert summary["leases"] == {"job-smoke": 1, "store-features": 1, "model-tokconv-smoke": 1}
    assert all(_records(storage, n)["00000001.json"]["released"] for n in summary["leases"])


def test_lease_settings_are_validated():
    assert load_job(SMOKE).lease.ttl_s == 600 and load_job(SMOKE).lease.wait_s == 0
    with pytest.raises(ConfigError, match="lease.ttl_s"):
        load_job(SMOKE, ["lease.ttl_s=0"])
    with pytest.raises(ConfigError, match="lease.wait_s"):
        load_job(SMOKE, ["lease.wait_s=-1"])
    with pytest.raises(ConfigError, match="lease.expiry"):
        load_job(SMOKE, ["lease.expiry=5"])


# ------------------------------------------------- S3's conditional PUT (moto's server, a proxy)

@pytest.mark.integration
def test_moto_honours_if_none_match_one_create_of_a_key_wins(s3_server):
    """Two creates of one key, then 8 clients (threads, each its own s3fs client) PUT each of 60
    keys at once (a barrier per key): each key won exactly once, and the winner's bytes are the
    ones stored. moto checks and stores without a lock, so this is its behaviour under the races
    it gets here (AWS S3 makes the check atomic and answers a conflict 409, retried: below)."""
    url = f"s3://{s3_server.make_bucket('excl')}/root"
    storage = Storage(url, s3_server.storage_options)
    assert create_exclusive(storage, "k.json", b"first")
    assert not create_exclusive(storage, "k.json", b"second")
    assert storage.read_bytes("k.json") == b"first"
    n_clients, n_keys = 8, 60
    barrier = threading.Barrier(n_clients)
    wins: dict[int, list[int]] = {c: [] for c in range(n_clients)}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            own = Storage(url, {**s3_server.storage_options, "skip_instance_cache": True})
            for i in range(n_keys):
                barrier.wait(timeout=60)
                if create_exclusive(own, f"race/{i}.json", f"c{c}".encode()):
                    wins[c].append(i)
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(w for ws in wins.values() for w in ws) == list(range(n_keys))  # once each
    for c, ws in wins.items():
        assert all(storage.read_bytes(f"race/{w}.json") == f"c{c}".encode() for w in ws)
    assert sum(1 for ws in wins.values() if ws) > 1, "no race happened: one client won every key"


class _ConflictProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of moto that answers the first ``conflicts`` conditional PUTs
    (``If-None-Match``) 409 ConditionalRequestConflict, what S3 answers while another conditional
    write to the key is in flight; everything else is forwarded. ``seen``: (method, path, code)."""

    def __init__(self, upstream: str, conflicts: int):
        self.upstream, self.conflicts, self.seen = urlsplit(upstream), conflicts, []
        super().__init__(("127.0.0.1", 0), _ConflictHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ConflictHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _forward(self):
        server: _ConflictProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.headers.get("If-None-Match") and server.conflicts > 0:
            server.conflicts -= 1
            server.seen.append((self.command, self.path, 409))
            data = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequest'
                    b'Conflict</Code><Message>A conflicting conditional operation is currently in '
                    b'progress against this resource. Please try again.</Message></Error>')
            self.send_response(409)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        conn = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port)
        conn.request(self.command, self.path, body=body, headers={
            k: v for k, v in self.headers.items() if k.lower() != "expect"})  # answered above
        resp = conn.getresponse()
        data = resp.read()
        server.seen.append((self.command, self.path, resp.status))
        self.send_response(resp.status)
        for k, v in resp.getheaders():  # a HEAD's Content-Length is the object's: kept
            if k.lower() not in ("transfer-encoding", "connection", "date", "server") and not (
                    k.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


@pytest.mark.integration
def test_a_409_conditional_conflict_is_retried_to_its_verdict(s3_server):
    """Behind the proxy: a create answered 409 twice is retried and creates the key; a create of
    an existing key answered 409 once is retried and gets its 412 (False); the lease protocol
    takes a lease through a 409."""
    bucket = s3_server.make_bucket("conflict")
    proxy = _ConflictProxy(s3_server.endpoint_url, conflicts=2)
    try:
        storage = Storage(f"s3://{bucket}/root", {**s3_server.storage_options,
                                                  "endpoint_url": proxy.url})
        assert create_exclusive(storage, "a.json", b"mine")
        puts = [code for m, p, code in proxy.seen if m == "PUT" and p.endswith("/a.json")]
        assert puts == [409, 409, 200], proxy.seen
        assert storage.read_bytes("a.json") == b"mine"
        proxy.conflicts = 1
        assert not create_exclusive(storage, "a.json", b"theirs")
        puts = [code for m, p, code in proxy.seen if m == "PUT" and p.endswith("/a.json")]
        assert puts == [409, 409, 200, 409, 412], proxy.seen
        assert storage.read_bytes("a.json") == b"mine"
        proxy.conflicts = 1
        lease = _lease(storage)
        assert lease.acquire() is None
        assert 409 in [c for m, p, c in proxy.seen if p.endswith("job-j/00000000.json")]
        lease.release()
        proxy.conflicts = 6  # more than create_exclusive retries: the error is raised, not hidden
        with pytest.raises(OSError):
            create_exclusive(storage, "b.json", b"x")
    finally:
        proxy.shutdown()
        proxy.server_close()
