"""The leaderboard on the smoke run's store (conftest's ``smoke_run``: a real extraction of the
sample videos with the tiny backbones, on the moto S3 endpoint): two presets trained through the
CLI with one budget on Ray Train, ranked by the metric, every figure equal to that preset's own
metrics.json in the JSON, the CSV and the page (opened in a real headless Chromium: formatted
numbers, decodable Pareto plots, no network request); a re-run trains and evaluates nothing.
Then the page without matplotlib, and bad input refused before any work."""
from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import dump_dom, image_sizes, lookup, network_requests, parse_dom

from pipeline.__main__ import main
from pipeline.fmt import FORMATTERS

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "smoke.yaml"
# two presets (each costs a Ray Train run in CI): the floor and a design
PRESETS = {"baseline_interp_linear": {},
           "tokenlearner_small": {"dim": 32, "num_tokens": 8, "select_hidden": 32, "heads": 2}}


def _leaderboard(smoke_run, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["leaderboard", str(SMOKE), *smoke_run.overrides, "evaluate.report_html=false",
                   "--presets", ",".join(PRESETS), "--preset-kwargs", json.dumps(PRESETS),
                   *extra])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def board(smoke_run, tmp_path_factory):
    """The leaderboard run twice (the second finds every preset done); its files copied out."""
    rc, first = _leaderboard(smoke_run)
    assert rc == 0, first[-5000:]
    rc, second = _leaderboard(smoke_run)
    assert rc == 0, second[-5000:]
    st, base = smoke_run.storage, f"runs/{smoke_run.job.name}/leaderboard"
    d = tmp_path_factory.mktemp("leaderboard")
    for f in ("leaderboard.json", "leaderboard.csv", "leaderboard.html"):
        (d / f).write_bytes(st.read_bytes(f"{base}/{f}"))
    own = {p: st.read_json(f"{base}/{p}/eval/metrics.json") for p in PRESETS}
    return json.loads((d / "leaderboard.json").read_text()), own, d, second


pytestmark = pytest.mark.integration


def test_ranked_by_the_metric_with_each_presets_own_numbers(board, smoke_run):
    b, own, d, _ = board
    rows = b["rows"]
    assert [r["preset"] for r in rows] == sorted(PRESETS, key=lambda p: -own[p]["mean_cosine"])
    assert [r["rank"] for r in rows] == [1, 2] and b["metric"] == "mean_cosine"
    assert b["higher_is_better"] is True and b["split"] == "val" and b["store"] == "features"
    assert b["budget"]["epochs"] == 2 and b["budget"]["warm_start"] is False
    for r in rows:
        m, c = own[r["preset"]], own[r["preset"]]["converter"]
        assert c["name"] == r["preset"] and r["converter_kwargs"] == PRESETS[r["preset"]]
        assert r["value"] == r["mean_cosine"] == m["mean_cosine"]
        for k in ("mean_r2", "mean_mse", "top1", "top5", "clips"):
            assert r[k] == m[k], k
        assert r["targets"] == {t: {k: v[k] for k in ("cosine", "r2", "mse")}
                                for t, v in m["targets"].items()}
        for k in ("params", "gflops_per_clip", "latency_ms_per_clip", "latency_ms_per_clip_cpu"):
            assert r[k] == c[k], k
        # cost vs the teachers from the store's measured latencies, the converter timed alike
        lat = b["backbone_latency_ms"]
        assert b["backbone_device"] == "cpu" and r["cost_device"] == "cpu"
        assert r["cost_ms_per_clip"] == c["like_backbones"]["latency_ms_per_clip"]
        teachers = lat["videomae"] + lat["timesformer"] + lat["vivit"]
        assert r["cost"]["mine"] == pytest.approx(lat["student"] + r["cost_ms_per_clip"])
        assert r["cost"]["vs_teachers"] == pytest.approx(r["cost_ms_per_clip"] / teachers)
    # Pareto: a row is on the front iff nothing is as cheap and as good, and better at one
    for r in rows:
        beaten = any(o["cost_ms_per_clip"] <= r["cost_ms_per_clip"] and o["value"] >= r["value"]
                     and (o["cost_ms_per_clip"] < r["cost_ms_per_clip"] or o["value"] > r["value"])
                     for o in rows if o is not r)
        assert r["pareto"] is (not beaten), r["preset"]
    # the floor row trained with the same budget as the smoke job's own model: the same numbers
    floor = next(r for r in rows if r["preset"] == "baseline_interp_linear")
    job_metrics = smoke_run.storage.read_json(f"runs/{smoke_run.job.name}/eval/metrics.json")
    assert floor["mean_cosine"] == pytest.approx(job_metrics["mean_cosine"], abs=1e-6)

    with open(d / "leaderboard.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["preset"] for t in table] == [r["preset"] for r in rows]
    for t, r in zip(table, rows, strict=True):
        assert float(t["mean_cosine"]) == r["mean_cosine"] and int(t["params"]) == r["params"]
        assert float(t["videomae.r2"]) == r["targets"]["videomae"]["r2"]
        assert float(t["cost.vs_teachers"]) == r["cost"]["vs_teachers"]


def test_a_rerun_skips_finished_presets(board, smoke_run):
    b, _, _, second = board
    assert all(not r["trained_now"] and not r["evaluated_now"] for r in b["rows"])
    assert second.count("reusing finished run") == len(PRESETS)
    st = smoke_run.storage
    for p in PRESETS:  # one training run each, never a second
        runs = [n for n in st.ls(f"runs/{smoke_run.job.name}/leaderboard/{p}/train")
                if n.startswith(p)]
        assert runs == [f"{p}-000"], runs


def test_the_page_in_a_browser(board):
    b, own, d, _ = board
    page = d / "leaderboard.html"
    dom = parse_dom(dump_dom(page))
    seen = set()
    for n in dom.numbers:
        a = n["attrs"]
        if a.get("data-source", "").startswith("metrics:"):
            preset = a["data-source"].split(":", 1)[1]
            assert n["text"] == FORMATTERS[a["data-fmt"]](lookup(own[preset], a["data-metric"]))
            seen.add((preset, a["data-metric"]))
    for p in PRESETS:
        for k in ("mean_cosine", "top1", "converter.params", "converter.gflops_per_clip",
                  "converter.latency_ms_per_clip", "targets.timesformer.cosine"):
            assert (p, k) in seen, (p, k)
    assert dom.text.index("baseline_interp_linear") > 0
    order = [dom.text.index(r["preset"] + (" ★" if r["pareto"] else "")) for r in b["rows"]]
    assert order == sorted(order)  # the table lists them best first
    from PIL import Image
    assert [i["alt"] for i in dom.images] == ["pareto latency", "pareto GFLOP"]
    for i in dom.images:
        px = np.asarray(Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1])))
                        .convert("L"), float)
        assert px.std() > 10 and len(np.unique(px)) > 20, i["alt"]
    assert all(x.complete and x.width > 100 for x in image_sizes(page))
    r = network_requests(page)
    assert r.page_requests == [r.page] and r.served == ["/leaderboard.html"]


def test_the_page_without_matplotlib_and_from_a_broken_board(board, tmp_path):
    _, _, d, _ = board
    out = tmp_path / "plain.html"
    code = (
        "import sys, json; sys.modules['matplotlib'] = None\n"
        "from pipeline.report.leaderboard import leaderboard_page\n"
        f"b = json.load(open({str(d / 'leaderboard.json')!r}))\n"
        f"open({str(out)!r}, 'w').write(leaderboard_page(b))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    page = out.read_text()
    assert "<img" not in page
    assert page.count("plots need matplotlib: pip install tokconv-pipeline[report]") == 2
    assert all(p in page for p in PRESETS) and 'data-metric="mean_cosine"' in page
    from pipeline.report.leaderboard import leaderboard_page
    bare = leaderboard_page({"rows": "junk"})
    assert bare.startswith("<!doctype html>") and "could not be drawn" in bare


def test_bad_presets_are_refused_before_any_work(smoke_run, capsys):
    for extra, said in (
        (["--presets", "convmix_small,nope"], "unknown converter 'nope'"),
        (["--presets", "convmix_small", "--preset-kwargs", "{convmix_small: {wings: 2}}"],
         "unknown key(s) wings"),
        (["--presets", "convmix_small", "--preset-kwargs", "{tokenlearner_small: {}}"],
         "tokenlearner_small not in --presets"),
        (["--presets", "convmix_small", "--metric", "accuracy"], "'accuracy' is not a metric"),
    ):
        rc = main(["leaderboard", str(SMOKE), *smoke_run.overrides, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and said in err, (extra, err)
