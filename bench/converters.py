"""Converter benchmark (issue 18): cost against the student on the GPU, fidelity on held-out
SOURCES. One module per command: bench/converter_cost.py (cost), bench/converter_fit.py
(quality, sweep); bench/converter_data.py holds what they share.

``cost``: the student encoder (V-JEPA 2 ViT-L, random init, bf16, batch --batch) timed in the same
run as every preset's ``forward_all`` and forward+backward, eager and, for the presets matching
``--compile``, under ``nn.Module.compile()`` (torch.compile, inductor) with the compile time and
the compiled outputs' largest difference to eager; torch.profiler's top kernels; params, GFLOPs
and 1-clip latency on GPU and CPU.

``quality``: every preset trained on the same feature store with the same budget (steps, batches,
seed, the train stage's objective and optimiser, head on), train data resident on the device;
scored on the store's ``val`` split (held-out sources: bench/footage.py) per target, beside
``baseline_interp_linear`` trained the same way.

``sweep``: one preset, the deficiency knobs one at a time (low-rank rank, mask ratio, Jacobian
weight) and all together, head on: fidelity and head top-1 per setting.

``merge``: the JSON of several quality (or sweep) runs on the same pairs, e.g. one process per
preset on one GPU, as one table (the floor first; sweep settings in sweep order).

    python bench/converters.py cost --compile 'convmix_small,perceiver_*' --out $OUT/cost.json
    python bench/converters.py quality --store /tmp/store --steps 2000 --out $OUT/quality.json
    python bench/converters.py sweep --store /tmp/store --preset convmix_small --out $OUT/sweep.json
    python bench/converters.py merge quality a.json b.json --out $OUT/quality.json
    # CPU smoke test of the script only (random pairs, narrow widths; never a result):
    python bench/converters.py quality --synthetic --student-dim 32 --teacher-dim 24 --steps 3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.converter_cost import cmd_cost
from bench.converter_data import BASELINE, write
from bench.converter_fit import cmd_quality, cmd_sweep, sweep_settings


def cost_table(res: dict) -> str:
    ref = res["student_ms"]["stock_eager"]
    lines = [(f"student forward (stock, eager, bf16, batch {res['batch']}): {ref:.1f} ms; "
              f"with the pipeline's rewrites {res['student_ms']['pipeline_eager']:.1f} ms"), "",
             ("| preset | params (M) | GFLOP/clip | fwd ms | % student | fwd+bwd ms | % student "
              "| fwd+bwd bf16 ms | compiled fwd ms | % student | compiled fwd+bwd ms | % student "
              "| compile s | 1 clip GPU ms | 1 clip CPU ms | top fwd ops | top fwd+bwd ops |"),
             "|---|" + "---:|" * 14 + "---|---|"]
    for name, r in res["rows"].items():
        c = r.get("compiled")
        comp = ("- | - | - | - | -" if not c else
                f"{c['fwd_ms']:.2f} | {c['fwd_pct_student']:.2f} | {c['fwdbwd_ms_autocast']:.2f} "
                f"| {c['fwdbwd_pct_student']:.2f} | {c['compile_s']:.0f}")
        top = lambda prof: "; ".join(f"{k.removeprefix('aten::')} {100 * v:.0f}%"
                                     for k, v in prof["ops"][:3])
        kern = f"{top(r['fwd_profile'])} | {top(r['fwdbwd_profile'])}"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | "
                     f"{r['fwd_ms']:.2f} | {r['fwd_pct_student']:.2f} | "
                     f"{r['fwdbwd_ms_autocast']:.2f} | {r['fwdbwd_pct_student']:.2f} | "
                     f"{r['fwdbwd_ms_bf16']:.2f} | {comp} | {r['latency_ms_clip_gpu']:.2f} | "
                     f"{r['latency_ms_clip_cpu']:.0f} | {kern} |")
    return "\n".join(lines)


def fidelity_table(res: dict, command: str) -> str:
    """Every preset (or setting) a row; differences vs the first row (the floor / knobs off)."""
    rows = res["rows"]
    base = rows[0]
    targets = list(base["targets"])
    head = ("| " + ("setting" if command == "sweep" else "preset") + " | "
            + " | ".join(f"{t} cos | {t} R^2" for t in targets)
            + " | mean cos (d) | mean R^2 (d) | top-1 | params (M) | GFLOP | ms/clip |")
    lines = [head, "|---|" + "---:|" * (2 * len(targets) + 6)]
    for r in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in r["deficiency"].items() if k != "warmup_steps")
        label = (knobs or "off") if command == "sweep" else r["preset"]
        cells = " | ".join(f"{r['targets'][t]['cosine']:.3f} | {r['targets'][t]['r2']:.3f}"
                           for t in targets)
        lines.append(f"| {label} | {cells} | {r['mean_cosine']:.4f} "
                     f"({r['mean_cosine'] - base['mean_cosine']:+.4f}) | "
                     f"{r['mean_r2']:.4f} ({r['mean_r2'] - base['mean_r2']:+.4f}) | {r['top1']} | "
                     f"{r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['latency_ms_clip']:.2f} |")
    return "\n".join(lines)


def markdown(res: dict, command: str) -> str:
    return cost_table(res) if command == "cost" else fidelity_table(res, command)


def cmd_merge(args) -> dict:
    """Rows of several runs of ``args.kind`` on the same pairs in one result."""
    parts = [json.loads(Path(p).read_text()) for p in args.files]
    descs = {p.get("description") for p in parts}
    if len(descs) != 1:
        raise SystemExit(f"merge: the runs are on different pairs: {sorted(map(str, descs))}")
    res = {k: v for k, v in parts[0].items() if k not in ("rows", "errors", "markdown", "date")}
    res["rows"] = [r for p in parts for r in p["rows"]]
    res["errors"] = {k: v for p in parts for k, v in p.get("errors", {}).items()}
    if args.kind == "sweep":
        order = [json.dumps(d, sort_keys=True) for d in sweep_settings(res["budget"]["steps"] // 4)]
        key = json.dumps
        res["rows"].sort(key=lambda r: order.index(key(r["deficiency"], sort_keys=True))
                         if key(r["deficiency"], sort_keys=True) in order else len(order))
    else:
        res["rows"].sort(key=lambda r: r["preset"] != BASELINE)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge")
    m.add_argument("kind", choices=("quality", "sweep"))
    m.add_argument("files", nargs="+", help="JSON results of that command")
    m.add_argument("--out", help="JSON of the merged result")
    for name in ("cost", "quality", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--out", help="JSON results (rewritten after every preset)")
        s.add_argument("--presets", default="*",
                       help="comma list of globs over list_converters(); the floor always runs")
        s.add_argument("--extra", action="append", default=[], metavar="PRESET[K=V;K=V]",
                       help="also a variant of a preset with these constructor overrides "
                            "(repeatable)")
        if name == "cost":
            s.add_argument("--batch", type=int, default=32)
            s.add_argument("--iters", type=int, default=20)
            s.add_argument("--student-iters", type=int, default=10)
            s.add_argument("--compile", default="",
                           help="comma list of globs: these presets are timed compiled too")
            s.add_argument("--device", default="cuda", help="cpu: a dry run of this script only")
            continue
        data = s.add_mutually_exclusive_group(required=True)
        data.add_argument("--store",
                          help="storage URL of a feature store with train / val (held-out) splits")
        data.add_argument("--synthetic", action="store_true",
                          help="random pairs: ONLY to smoke-test this script")
        s.add_argument("--store-name", default="features")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--steps", type=int, default=2000 if name == "quality" else 1000)
        s.add_argument("--batch", type=int, default=16)
        s.add_argument("--lr", type=float, default=1e-3)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--train-clips", type=int, default=8, help="--synthetic only")
        s.add_argument("--eval-clips", type=int, default=4, help="--synthetic only")
        s.add_argument("--student-dim", type=int, default=32, help="--synthetic only")
        s.add_argument("--teacher-dim", type=int, default=24, help="--synthetic only")
        if name == "quality":
            s.add_argument("--no-floor", action="store_true",
                           help="leave the floor out (another process of a merged run trains it)")
            s.add_argument("--compile", action="store_true",
                           help="train the converter + head under nn.Module.compile()")
        else:
            s.add_argument("--preset", default="convmix_small")
            s.add_argument("--settings", default="",
                           help="comma list of indices into the sweep's settings (default all)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    commands = {"cost": cmd_cost, "quality": cmd_quality, "sweep": cmd_sweep, "merge": cmd_merge}
    res = commands[args.command](args)
    kind = args.kind if args.command == "merge" else args.command
    res["markdown"] = markdown(res, kind) if res["rows"] else "(no rows)"
    write(args.out, res)
    print("\n" + res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
