"""report.html and the model card summary: formatters, the training-log reader, the summary
arithmetic, and the page itself opened in a real headless Chromium (tests/browser.py).

The page under test is rendered from a REAL evaluation (report_inputs.real_evaluation: converters
trained for a few epochs on the tiny real feature store, evaluated with evaluate_model) after a
round trip through the files the pipeline writes (metrics.json, details.json, the JSONL log).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import dump_dom, image_sizes, lookup, network_requests, parse_dom, screenshot
from report_inputs import real_evaluation

from pipeline.evaluate import details_json
from pipeline.fmt import FORMATTERS, fmt, fmt_gflop, fmt_int, fmt_ms, fmt_num, fmt_pct
from pipeline.report import load_train_log, model_card_summary, parse_train_log, write_report
from pipeline.report.summary import cost_facts, promotion_decision
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- formatters


@pytest.mark.parametrize(
    "x, want",
    [
        (0.8333333333333334, "0.8333"),
        (2.7434560000187957, "2.743"),
        (12345.6, "12,350"),
        (1234567.0, "1,235,000"),
        (999.96, "1,000"),
        (9.9996, "10.00"),
        (123.456, "123.5"),
        (1.0, "1.000"),
        (-0.5, "-0.5000"),
        (0, "0"),
        (0.0, "0"),
        (7, "7.000"),
        (0.0001, "0.0001000"),
        (0.0000123456, "1.235e-05"),
        (-2.5e-9, "-2.500e-09"),
        (None, "n/a"),
        (float("nan"), "NaN"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
    ],
)
def test_fmt_num(x, want):
    assert fmt_num(x) == want


def test_fmt_units_and_kinds():
    assert fmt_num(0.83333, sig=3) == "0.833"
    assert fmt_int(1234567) == "1,234,567" and fmt_int(1234.6) == "1,235" and fmt_int(0) == "0"
    assert (
        fmt_ms(0.41234) == "0.4123 ms" and fmt_ms(1234.5678) == "1,235 ms" and fmt_ms(None) == "n/a"
    )
    assert fmt_pct(0.8333) == "83.3%" and fmt_pct(1.0) == "100%" and fmt_pct(0.4) == "40.0%"
    assert (
        fmt_pct(0.0005) == "0.0500%"
        and fmt_pct(-0.25) == "-25.0%"
        and fmt_pct(float("nan")) == "NaN"
    )
    assert fmt_gflop(3.1416) == "3.142 GFLOP"
    assert fmt(0.5, "pct") == "50.0%" and set(FORMATTERS) == {"num", "int", "ms", "pct", "gflop"}
    with pytest.raises(KeyError, match="unknown kind 'percent'"):
        fmt(0.5, "percent")
    for bad in ("0.5", True, [1]):
        with pytest.raises(TypeError, match="expected a number"):
            fmt_num(bad)


# ---------------------------------------------------------------- training log


def test_parse_train_log_is_tolerant():
    lines = [
        json.dumps({"step": 1, "epoch": 0, "loss": 3.0, "lr": 1e-3, "note": "text is ignored"}),
        "not json",
        json.dumps([1, 2]),
        json.dumps({"kind": "step", "loss": 1.0}),  # no step
        json.dumps({"kind": "step", "step": 2, "epoch": 0, "loss": float("nan"), "grad_norm": 2.0}),
        "",
        json.dumps(
            {"kind": "val", "step": 2, "epoch": 0, "val.videomae.cosine": 0.4, "val.top1": 0.5}
        ),
        json.dumps({"kind": "mystery", "step": 3}),
        json.dumps(
            {"step": 2, "epoch": 0, "loss": 2.5, "flag": True}
        ),  # a resumed run re-logs step 2
        json.dumps({"step": 3, "epoch": 1, "loss": 2.0, "reg.nuclear": 5.0, "w.nuclear": 0.1}),
    ]
    log = parse_train_log("\n".join(lines), source="x.jsonl")
    assert log.bad_lines == 4 and log.source == "x.jsonl" and log.error is None
    assert [r["step"] for r in log.steps] == [1, 2, 3]
    assert log.steps[1] == {"step": 2, "epoch": 0, "loss": 2.5}  # the last record of a step wins
    assert log.series("loss") == ([1, 2, 3], [3.0, 2.5, 2.0])
    assert log.keys("reg.") == ["reg.nuclear"] and log.keys("w.") == ["w.nuclear"]
    assert log.series("val.top1", kind="val", x="epoch") == ([0], [0.5])
    assert parse_train_log(b"").steps == []


def test_load_train_log(tmp_path):
    storage = Storage(str(tmp_path))
    assert load_train_log(storage, {}) is None and load_train_log(storage, None) is None
    missing = load_train_log(storage, {"metrics_log": "runs/j/train/metrics.jsonl"})
    assert missing.error.startswith("FileNotFoundError") and missing.steps == []
    storage.write_bytes("runs/j/train/metrics.jsonl", b'{"step": 1, "loss": 1.5}\n')
    log = load_train_log(storage, {"metrics_log": "runs/j/train/metrics.jsonl"})
    assert log.steps == [{"step": 1, "loss": 1.5}] and log.source == storage.url(
        "runs/j/train/metrics.jsonl"
    )


# ---------------------------------------------------------------- summary arithmetic


def _metrics(**kw):
    m = {
        "split": "val",
        "clips": 10,
        "mean_cosine": 0.5,
        "mean_r2": 0.2,
        "top1": 0.7,
        "top5": 0.9,
        "targets": {
            t: {"cosine": 0.5, "r2": 0.2, "mse": 0.8} for t in ("videomae", "timesformer", "vivit")
        },
        "converter": {
            "name": "c",
            "params": 1000,
            "gflops_per_clip": 2.0,
            "latency_ms_per_clip": 1.0,
            "latency_device": "cuda",
            "latency_ms_per_clip_cpu": 6.0,
        },
    }
    return {**m, **kw}


def _by_label(facts):
    return {f.label: f.value for f in facts}


def test_cost_facts_from_given_latencies():
    m = _metrics()
    lat = {"student": 10.0, "videomae": 2.0, "timesformer": 3.0, "vivit": 4.0}
    facts, notes = cost_facts(m, lat, backbone_device="cuda")
    v = _by_label(facts)
    assert (
        v["student + 3 teachers (latency)"] == 19.0 and v["student + converter (latency)"] == 11.0
    )
    assert v["saving per clip (latency)"] == 8.0
    assert v["saving (latency, share of student + teachers)"] == pytest.approx(8 / 19)
    assert v["converter / the teachers it replaces (latency)"] == pytest.approx(1 / 9)
    assert any("GFLOP" in n and "not computed" in n for n in notes)
    # timed on CPU: the converter's CPU latency is the one compared
    v = _by_label(cost_facts(m, lat, backbone_device="cpu")[0])
    assert v["student + converter (latency)"] == 16.0
    # another device than the converter's: not comparable, so left out and said
    facts, notes = cost_facts(m, lat, backbone_device="tpu")
    assert "saving per clip (latency)" not in _by_label(facts) and any(
        "timed on cuda" in n for n in notes
    )
    facts, notes = cost_facts(m, {"student": 10.0, "videomae": 2.0})
    assert "saving per clip (latency)" not in _by_label(facts)
    assert any("no figure for timesformer, vivit" in n for n in notes)
    facts, notes = cost_facts(m)
    assert any("no measured student/teacher latency" in n for n in notes)
    assert _by_label(facts)["converter latency per clip (CPU, batch 1)"] == 6.0


def test_promotion_decision():
    v, r = promotion_decision(_metrics())
    assert v == "not exported yet: it would become latest" and "no model is exported yet" in r
    v, r = promotion_decision(_metrics(latest={"version": "v1", "mean_cosine": 0.4}))
    assert v == "not exported yet: would be promoted" and "0.5000 against 0.4000" in r and "v1" in r
    v, _ = promotion_decision(_metrics(latest={"version": "v1", "mean_cosine": 0.5}))
    assert v == "not exported yet: would NOT be promoted"  # a tie keeps latest
    v, r = promotion_decision(
        _metrics(latest={"version": "v1", "mean_mse": 0.9}), metric="mean_mse"
    )
    assert (
        v == "not exported yet" and "not available" in r and "mean_mse" in r
    )  # none in this model's
    v, _ = promotion_decision(
        _metrics(mean_mse=0.8, latest={"version": "v1", "mean_mse": 0.9}),
        metric="mean_mse",
        higher_is_better=False,
    )
    assert v == "not exported yet: would be promoted"
    v, r = promotion_decision(_metrics(latest={"version": "v1", "top1": 0.9}))
    assert v == "not exported yet" and "has no mean_cosine" in r
    v, r = promotion_decision(_metrics(latest={"version": "v1", "skipped": "layouts differ"}))
    assert "not compared: layouts differ" in r
    v, r = promotion_decision(
        _metrics(),
        {
            "promoted": True,
            "version": "v2",
            "metric": "mean_cosine",
            "value": 0.5,
            "previous": {"version": "v1"},
            "previous_value": 0.4,
            "compared_on": "this evaluation's split",
        },
    )
    assert v == "promoted: v2 is latest" and "beats 0.4000 of the previous latest v1" in r
    v, r = promotion_decision(
        _metrics(),
        {
            "promoted": False,
            "version": "v2",
            "metric": "mean_cosine",
            "value": 0.3,
            "previous": {"version": "v1"},
            "previous_value": 0.4,
            "compared_on": "its recorded value",
        },
    )
    assert v == "not promoted: v2 published, latest stays v1" and "0.3000 does not beat 0.4000" in r


# ---------------------------------------------------------------- the page, from a real evaluation


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The real evaluation written to files and read back, as run_evaluate leaves them, then the
    report of those files (plus the floor and the training log)."""
    d = tmp_path_factory.mktemp("report")
    ev = real_evaluation(Storage(str(d / "store")))
    (d / "metrics.json").write_text(json.dumps(ev.metrics))
    (d / "details.json").write_bytes(details_json(ev.details))
    (d / "floor.json").write_text(json.dumps(ev.floor))
    (d / "metrics.jsonl").write_text(ev.train_log)
    srcs = {
        "metrics": json.loads((d / "metrics.json").read_text()),
        "details": json.loads((d / "details.json").read_text()),
        "floor": json.loads((d / "floor.json").read_text()),
    }
    page = write_report(
        srcs["metrics"],
        details=srcs["details"],
        floor_metrics=srcs["floor"],
        train_log=parse_train_log((d / "metrics.jsonl").read_text(), "metrics.jsonl"),
    )
    (d / "report.html").write_text(page, encoding="utf-8")
    return d, srcs


def test_dom_shows_the_metrics_as_formatted(rendered):
    d, srcs = rendered
    dom = parse_dom(dump_dom(d / "report.html"))
    m = srcs["metrics"]
    checked = set()
    for n in dom.numbers:
        a = n["attrs"]
        if "data-metric" in a:  # a figure read from an input: shown as the formatter writes it
            value = lookup(srcs[a["data-source"]], a["data-metric"])
            assert n["text"] == FORMATTERS[a["data-fmt"]](value), a
            checked.add((a["data-source"], a["data-metric"]))
    targets = list(m["targets"])
    want = {
        ("metrics", k)
        for k in (
            "clips",
            "mean_cosine",
            "mean_r2",
            "mean_mse",
            "top1",
            "top5",
            "mean_class_accuracy",
            "converter.params",
            "converter.head_params",
            "converter.gflops_per_clip",
            "converter.latency_ms_per_clip",
            "latest.mean_cosine",
            "latest.top1",
        )
    }
    want |= {
        ("metrics", f"targets.{t}.{k}")
        for t in targets
        for k in ("cosine", "cosine_p05", "r2", "mse")
    }
    want |= {("metrics", f"latest.targets.{t}.cosine") for t in targets}
    want |= {("floor", f"targets.{t}.{k}") for t in targets for k in ("cosine", "r2")}
    want |= {("floor", "mean_cosine"), ("floor", "converter.params")}
    want |= {("details", f"head.per_class_accuracy.{i}") for i in range(3)}
    assert want <= checked, sorted(want - checked)
    assert (
        sum(
            s == "details" and k.startswith("targets.timesformer.per_clip_cosine")
            for s, k in checked
        )
        == 5
    )
    # what the issue complained of: no unformatted floats anywhere on the page
    # (4 significant digits need at most 7 decimals: 0.0001234; a raw float has 15-17)
    assert not re.search(r"\d\.\d{8,}", dom.text), re.search(r".{40}\d\.\d{8,}.{20}", dom.text)
    for text in (
        fmt_num(m["mean_cosine"]),
        fmt_pct(m["top1"]),
        fmt_int(m["converter"]["params"]),
        fmt_ms(m["converter"]["latency_ms_per_clip"]),
    ):
        assert text in dom.text
    assert "would be promoted" in dom.text or "would NOT be promoted" in dom.text
    assert (
        "no measured student/teacher latency given" in dom.text
    )  # none were given: said, not invented


def _png_pixels(uri: str):
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    img.load()
    return img


def test_every_image_decodes_and_is_not_blank(rendered, tmp_path):
    d, _ = rendered
    dom = parse_dom(dump_dom(d / "report.html"))
    alts = [i["alt"] for i in dom.images]
    assert alts == [
        "training curves",
        "validation per epoch",
        "cosine side by side",
        "R^2 side by side",
        "per-clip cosine histograms",
        "videomae per-token cosine",
        "timesformer per-token cosine",
        "confusion matrix",
        "per-class accuracy",
    ]
    sizes = {}
    for i in dom.images:
        img = _png_pixels(i["src"])
        px = np.asarray(img.convert("L"), dtype=np.float64)
        assert px.std() > 10 and len(np.unique(px)) > 20, f"{i['alt']}: looks blank"
        sizes[i["alt"]] = img.size
    for b in image_sizes(d / "report.html"):  # as the browser decoded them
        assert b.complete and (b.width, b.height) == sizes[b.alt], b
    shot = np.asarray(
        _png_pixels(
            "data:image/png;base64,"
            + base64.b64encode(
                screenshot(d / "report.html", tmp_path / "report.png").read_bytes()
            ).decode()
        ).convert("L"),
        float,
    )
    assert shot.shape[0] > 3000 and shot.std() > 10  # a long page that is not one colour ...
    inked = np.where(shot.min(axis=1) < 200)[0]
    assert inked.max() > 0.97 * shot.shape[0]  # ... captured to its last section


def test_the_page_makes_no_network_request(rendered):
    r = network_requests(rendered[0] / "report.html")
    assert r.page_requests == [r.page] and r.served == ["/report.html"]


def test_the_network_probe_sees_external_and_local_references(tmp_path):
    """The probe above must be able to fail: a page with a web font, a remote image and a local
    file is caught by both records."""
    page = tmp_path / "leaky.html"
    page.write_text(
        '<!doctype html><html><head><link rel="stylesheet" '
        'href="https://fonts.googleapis.com/css?family=Roboto"></head><body>'
        '<img src="http://cdn.invalid/x.png"><img src="local.png"></body></html>'
    )
    r = network_requests(page)
    assert r.page_requests[0] == r.page
    assert {
        "https://fonts.googleapis.com/css?family=Roboto",
        "http://cdn.invalid/x.png",
        r.page.replace("leaky.html", "local.png"),
    } <= set(r.page_requests)
    assert "/local.png" in r.served


def test_model_card_summary_states_the_report_figures(rendered):
    _, srcs = rendered
    m = srcs["metrics"]
    card = model_card_summary(m, report_url="https://example.org/runs/j/eval/report.html")
    summary = re.search(
        r'<section id="summary">.*?</section>', write_report(m, details=srcs["details"]), re.DOTALL
    )
    figures = [n["text"] for n in parse_dom(summary.group(0)).numbers]
    assert len(figures) >= 20
    for f in figures:
        assert f in card, f
    assert "[report.html](https://example.org/runs/j/eval/report.html)" in card
    # written before export decides: where the decision is recorded, and the prediction
    assert "**Promotion:** decided by the export stage once this version is published" in card
    assert "the evaluation predicted: would" in card
    assert f"| videomae | {fmt_num(m['targets']['videomae']['cosine'])} |" in card


# ---------------------------------------------------------------- what is missing or broken


def test_report_without_matplotlib(rendered, tmp_path):
    """matplotlib made unimportable in a fresh interpreter (as if not installed): the page keeps its
    tables and says, where each figure would be, what is missing."""
    d, srcs = rendered
    out = tmp_path / "plain.html"
    code = (
        "import sys, json; sys.modules['matplotlib'] = None\n"
        "from pipeline.report import write_report, parse_train_log\n"
        f"d = {str(d)!r}\n"
        "m = json.load(open(d + '/metrics.json')); det = json.load(open(d + '/details.json'))\n"
        "log = parse_train_log(open(d + '/metrics.jsonl').read())\n"
        f"open({str(out)!r}, 'w').write(write_report(m, details=det, train_log=log))\n"
        "assert 'matplotlib' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    page = out.read_text()
    dom = parse_dom(dump_dom(out))
    assert dom.images == [] and "<img" not in page
    assert (
        page.count("plots need matplotlib: pip install tokconv-pipeline[report]") == 9
    )  # one per figure
    assert {"summary", "curves", "side-by-side", "histograms", "failures", "head", "cost"} == set(
        re.findall(r'<section id="([a-z-]+)">', page)
    )
    mc = [n for n in dom.numbers if n["attrs"].get("data-metric") == "mean_cosine"]
    assert mc and all(n["text"] == fmt_num(srcs["metrics"]["mean_cosine"]) for n in mc)
    assert "worst temporal slice" in dom.text and "could not be drawn" not in dom.text


def test_sections_say_what_they_lack_and_broken_input_never_fails(rendered):
    _, srcs = rendered
    m = srcs["metrics"]
    bare = parse_dom(write_report(m)).text
    for said in ("no training log", "no floor run given", "no per-clip details were given"):
        assert said in bare
    assert fmt_num(m["mean_cosine"]) in bare

    broken = json.loads(json.dumps(srcs["details"]))
    broken["targets"]["timesformer"]["per_token_cosine"] = broken["targets"]["timesformer"][
        "per_token_cosine"
    ][:-1]
    broken["head"] = {"class_names": ["a"], "confusion": "??"}
    page = write_report(
        m,
        details=broken,
        train_log=parse_train_log("garbage\n{}\n"),
        floor_metrics={"targets": "nonsense"},
        backbone_latency_ms={"student": "fast"},
    )
    text = parse_dom(page).text
    assert (
        "this section could not be drawn: ValueError: "
        "timesformer: 35 per-token values for grid [4, 3, 3]" in text
    )
    assert "this section could not be drawn: KeyError: 'per_class_accuracy'" in text
    assert "2 malformed lines of the log were skipped" in text
    assert fmt_num(m["mean_cosine"]) in text and 'alt="per-clip cosine histograms"' in page
    for junk in ({}, {"targets": None, "converter": "x"}, None):
        p = write_report(junk)
        assert p.startswith("<!doctype html>") and "</html>" in p
    assert all(math.isfinite(v) for v in srcs["details"]["targets"]["videomae"]["per_clip_cosine"])


def test_write_run_report_never_fails_the_stage(rendered, tmp_path, capsys):
    """Inputs that are not there cost their sections; a report that cannot be written is said and
    returns None instead of raising."""
    from pipeline.report import write_run_report

    _, srcs = rendered
    storage = Storage(str(tmp_path))
    url = write_run_report(storage, "runs/j", srcs["metrics"])  # no details.json, no train.json
    page = parse_dom(storage.read_bytes("runs/j/eval/report.html").decode()).text
    assert url == storage.url("runs/j/eval/report.html")
    assert "no per-clip details were given" in page and "no training log" in page
    storage.write_bytes("runs/k/eval", b"a file where the eval directory should be")
    assert write_run_report(storage, "runs/k", srcs["metrics"]) is None
    assert "[report] runs/k/eval/report.html not written" in capsys.readouterr().err
