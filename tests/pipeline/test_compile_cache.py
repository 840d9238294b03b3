"""torch.compile's portable cache in storage: a second process with an empty local inductor cache
loads what the first one compiled, over a real S3 endpoint; bad entries cost a cold compile, never
the job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.compile_cache import CompileCache, cache_key
from pipeline.config import JobConfig
from pipeline.extract import compile_cache_storage
from pipeline.storage import Storage

# one process of a worker's life: load the entry (if any), compile and run a small block, save when
# nothing was loaded; prints what happened as one JSON line
WORKER = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    from pipeline.compile_cache import CompileCache, graphs_compiled
    from pipeline.storage import Storage
    cache = CompileCache(Storage(sys.argv[1], json.loads(sys.argv[2])), "k")
    loaded, note = cache.load()
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        y = torch.compile(block)(x)
        ref = block(x)
    saved = 0 if loaded else cache.save()
    print(json.dumps({"loaded": loaded, "note": note, "saved": saved, "compiled": graphs_compiled(),
                      "inductor": dict(counters["inductor"]),
                      "max_err": (y - ref).abs().max().item()}))
""")


def _worker(tmp_path, url: str, options: dict, inductor_dir: str) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor_dir)}
    out = subprocess.run([sys.executable, str(script), url, json.dumps(options)], check=False,
                         capture_output=True, text=True, env=env, timeout=600, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_fresh_process_loads_what_another_compiled_over_s3(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket('compile')}/cache"
    first = _worker(tmp_path, url, s3_server.storage_options, "inductor-a")
    assert first["loaded"] is False and first["note"].startswith("no entry yet")
    assert first["compiled"] >= 1 and first["saved"] > 0
    assert s3_server.fs().exists(url.removeprefix("s3://") + "/k.bin")
    # an empty local inductor cache, as on a new pod: the graph comes from the S3 entry, nothing is
    # compiled
    second = _worker(tmp_path, url, s3_server.storage_options, "inductor-b")
    assert second["loaded"] is True and second["note"].startswith("loaded ")
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert second["compiled"] == 0
    assert second["max_err"] < 1e-5 and first["max_err"] < 1e-5


def test_a_corrupt_entry_is_reported_and_not_raised(tmp_path):
    storage = Storage(str(tmp_path / "cache"))
    cache = CompileCache(storage, "k")
    assert cache.load() == (False, "no entry yet; compiling cold")
    storage.write_bytes("k.bin", b"half a file")
    loaded, note = cache.load()
    assert loaded is False and note.startswith("rejected") and note.endswith("compiling cold")


def test_the_key_follows_what_changes_the_compiled_graphs():
    models = JobConfig().models.model_dump()
    shape, cpu = (32, 32, 256, 256, 3), torch.device("cpu")
    key = cache_key(models, shape, cpu)
    assert len(key) == 16 and key == cache_key(dict(models), shape, cpu)
    assert cache_key({**models, "seed": 7}, shape, cpu) == key  # weights values are graph inputs
    assert cache_key({**models, "compile": ["student"]}, shape, cpu) != key
    assert cache_key({**models, "rewrites": []}, shape, cpu) != key
    assert cache_key(models, (16, *shape[1:]), cpu) != key
    threads = torch.get_num_threads()
    try:  # inductor's own keys include the thread count (an actor's num_cpus)
        torch.set_num_threads(threads + 1)
        assert cache_key(models, shape, cpu) != key
    finally:
        torch.set_num_threads(threads)


def test_compile_cache_lives_under_the_job_storage_unless_given_its_own_place(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    job = JobConfig()
    assert compile_cache_storage(job, storage).url() == str(tmp_path / "run" / "cache" / "compile")
    job = JobConfig.model_validate({"extract": {"compile_cache": str(tmp_path / "shared")},
                                    "storage": {"options": {"anon": False}}})
    own = compile_cache_storage(job, storage)
    assert own.url() == str(tmp_path / "shared") and own.options == {"anon": False}
    off = JobConfig.model_validate({"extract": {"compile_cache": None}})
    assert compile_cache_storage(off, storage) is None
