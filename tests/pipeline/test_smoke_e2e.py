"""The smoke job end to end through the CLI on a real local Ray cluster, with videos and storage on
a real S3 endpoint (moto's server on 127.0.0.1; the run is conftest's ``smoke_run``, shared with
test_leaderboard): a consumer downloads the exported model from the bucket and reproduces the
evaluated outputs bit for bit; the extraction recorded the backbones' latency in the store's
meta; the report, opened in a real headless Chromium, shows metrics.json's numbers as formatted,
decodable non-blank images, the measured cost line and export's decision, and asks the network
for nothing; the model card states the same summary and links the report."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from browser import dump_dom, image_sizes, lookup, network_requests, parse_dom
from safetensors.torch import load

from pipeline.artifacts import ModelRegistry
from pipeline.fmt import FORMATTERS, fmt_ms
from tokconv.io import load_converter, load_head

pytestmark = pytest.mark.integration
MODELS = ("student", "videomae", "timesformer", "vivit")


def test_smoke_job_on_s3_and_reload_from_bucket(smoke_run, s3_server, tmp_path):
    results, job, storage = smoke_run.stages, smoke_run.job, smoke_run.storage
    bucket = job.storage.url.split("/")[2]
    assert set(results) == {"extract", "train", "evaluate", "export"}  # summary.json: sorted keys
    ext = results["extract"]
    assert ext["listed"] == 4 and ext["processed"] + ext["failed"] == ext["listed"]
    assert ext["failed"] == 0
    ev = results["evaluate"]
    assert ev["clips"] >= 1 and -1.0 <= ev["mean_cosine"] <= 1.0
    exp = results["export"]
    assert exp["promoted"] is True and exp["uri"].startswith(f"s3://{bucket}/smoke/models/")

    # A consumer with only the bucket: download, load with tokconv alone, reproduce.
    local = ModelRegistry(storage, job.model_name).download("latest", str(tmp_path / "model"))
    converter, head = load_converter(local), load_head(local)
    metrics = storage.read_json(f"runs/{job.name}/eval/metrics.json")
    sample = load(storage.read_bytes(f"runs/{job.name}/eval/sample.safetensors"))
    with torch.no_grad():
        outs = converter.forward_all(sample["student"])
        logits = head(sample["student"], outs)
    for target, out in outs.items():
        assert torch.equal(out, sample[f"out.{target}"]), target
    assert torch.equal(logits, sample["logits"])
    assert set(outs) == {"videomae", "timesformer", "vivit"}
    assert metrics["targets"].keys() == outs.keys()
    assert s3_server.fs().exists(f"{bucket}/smoke/runs/{job.name}/summary.json")


@pytest.fixture(scope="module")
def smoke_report(smoke_run, tmp_path_factory):
    """The smoke run's report.html (as export left it), metrics.json and the store's meta.json,
    copied out of the bucket."""
    st, name = smoke_run.storage, smoke_run.job.name
    d = tmp_path_factory.mktemp("smoke_report")
    page = d / "report.html"
    page.write_bytes(st.read_bytes(f"runs/{name}/eval/report.html"))
    srcs = {"metrics": st.read_json(f"runs/{name}/eval/metrics.json"),
            "store": st.read_json(f"features/{smoke_run.job.store}/meta.json")}
    return page, srcs


def test_backbone_latency_recorded_by_the_extraction(smoke_report):
    meta = smoke_report[1]["store"]
    lat = meta["backbone_latency_ms"]
    assert set(lat) == set(MODELS) and all(v > 0 for v in lat.values()), lat
    assert meta["backbone_device"] == "cpu" and meta["backbone_latency_batch"] == 2
    # the converter timed the same way: batch 2 on the CPU
    like = smoke_report[1]["metrics"]["converter"]["like_backbones"]
    assert like["device"] == "cpu" and like["batch"] == 2 and like["latency_ms_per_clip"] > 0


def test_the_smoke_report_in_a_browser(smoke_report, smoke_run):
    page, srcs = smoke_report
    m, meta = srcs["metrics"], srcs["store"]
    dom = parse_dom(dump_dom(page))
    checked = set()
    for n in dom.numbers:  # every number read from metrics.json / meta.json, as formatted
        a = n["attrs"]
        if a.get("data-source") in srcs:
            value = lookup(srcs[a["data-source"]], a["data-metric"])
            assert n["text"] == FORMATTERS[a["data-fmt"]](value), a
            checked.add((a["data-source"], a["data-metric"]))
    want = {("metrics", k) for k in ("clips", "mean_cosine", "mean_r2", "top1", "top5",
                                     "converter.params", "converter.gflops_per_clip",
                                     "converter.like_backbones.latency_ms_per_clip")}
    want |= {("metrics", f"targets.{t}.{k}") for t in m["targets"] for k in ("cosine", "r2")}
    want |= {("store", f"backbone_latency_ms.{k}") for k in MODELS}
    assert want <= checked, sorted(want - checked)
    assert not re.search(r"\d\.\d{8,}", dom.text)  # no raw floats

    # the summary card's cost line: measured figures, student + converter vs student + teachers
    summary = parse_dom(re.search(r'<section id="summary">.*?</section>', page.read_text(),
                                  re.DOTALL).group(0)).text
    lat = meta["backbone_latency_ms"]
    mine = lat["student"] + m["converter"]["like_backbones"]["latency_ms_per_clip"]
    assert f"student + 3 teachers (latency) {fmt_ms(sum(lat.values()))}" in summary
    assert f"student + converter (latency) {fmt_ms(mine)}" in summary
    # the decision export took (the page was re-rendered after promotion)
    version = smoke_run.stages["export"]["version"]
    assert f"Promotion: promoted: {version} is latest" in summary
    # the floor: the smoke converter is the floor itself
    assert "no floor column: this model is the floor (baseline_interp_linear)" in dom.text

    # every image decodes and is not blank, in our decoder and in the browser's
    from PIL import Image
    assert len(dom.images) >= 7
    sizes = {}
    for i in dom.images:
        img = Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1])))
        px = np.asarray(img.convert("L"), dtype=np.float64)
        assert px.std() > 10 and len(np.unique(px)) > 20, f"{i['alt']}: looks blank"
        sizes[i["alt"]] = img.size
    for b in image_sizes(page):
        assert b.complete and (b.width, b.height) == sizes[b.alt], b

    r = network_requests(page)
    assert r.page_requests == [r.page] and r.served == ["/report.html"]


def test_the_model_card_states_the_summary_and_links_the_report(smoke_run, smoke_report):
    st, job = smoke_run.storage, smoke_run.job
    version = smoke_run.stages["export"]["version"]
    card = st.read_bytes(f"models/{job.model_name}/{version}/README.md").decode()
    m = smoke_report[1]["metrics"]
    report_url = st.url(f"runs/{job.name}/eval/report.html")
    assert f"[report.html]({report_url})" in card
    lat = smoke_report[1]["store"]["backbone_latency_ms"]
    assert f"| student + 3 teachers (latency) | {fmt_ms(sum(lat.values()))} |" in card
    for key in ("mean_cosine", "mean_r2"):
        assert f"| {FORMATTERS['num'](m[key])} |" in card, key
    assert f"| {FORMATTERS['pct'](m['top1'])} |" in card
    assert "**Promotion:** decided by the export stage" in card
    published = json.loads(st.read_bytes(f"models/{job.model_name}/{version}/metrics.json"))
    assert published["mean_cosine"] == m["mean_cosine"]
