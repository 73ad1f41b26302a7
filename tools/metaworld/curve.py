#!/usr/bin/env python3
"""Success against training time for a Meta-World run (issue 15).

Reads `<run>/train/metrics.jsonl` (elapsed training seconds per optimizer step) and every
`<run>/curve/step-<N>/results.json` that `openvla eval metaworld` wrote for the checkpoint of
step N, and writes `<run>/curve/curve.md` (a table: step, samples seen, training minutes,
episode-weighted success with its 95% interval, per-task successes) and `<run>/curve/curve.svg`
(success against training minutes, with the training loss on a second axis).

Standard library only: it runs in the project venv or any Python 3.9+.

    python3 tools/metaworld/curve.py runs/metaworld/default [--batch 32]
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path


def fail(msg):
    print(f"curve.py: {msg}", file=sys.stderr)
    sys.exit(2)


def read_metrics(path):
    if not path.is_file():
        fail(f"{path} not found: train first (openvla finetune writes it)")
    recs = {}
    with path.open() as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not JSON ({e})")
            recs[r["step"]] = r
    return recs


def training_seconds(metrics, step):
    """Training time up to `step`, summed over resumed segments (elapsed_s restarts at 0)."""
    total, prev = 0.0, 0.0
    for s in sorted(metrics):
        if s > step:
            break
        e = metrics[s]["elapsed_s"]
        if e < prev:  # a resumed process: its clock restarted
            total += prev
        prev = e
    return total + prev


def read_points(curve_dir, metrics, batch):
    points = []
    for d in sorted(curve_dir.glob("step-*")):
        m = re.fullmatch(r"step-0*(\d+)", d.name)
        res = d / "results.json"
        if not m or not res.is_file():
            continue
        step = int(m.group(1))
        r = json.loads(res.read_text())
        if not r.get("complete", False):
            print(f"curve.py: {res} is partial; skipped", file=sys.stderr)
            continue
        w = r["episode_weighted_mean"]
        tasks = {t: (v["successes"], v["episodes"]) for t, v in r["tasks"].items()}
        loss = metrics.get(step, {}).get("loss")
        points.append({
            "step": step,
            "samples": step * batch,
            "minutes": training_seconds(metrics, step) / 60.0,
            "success": w["success_rate"],
            "ci": w["wilson95"],
            "episodes": w["episodes"],
            "loss": loss,
            "tasks": tasks,
        })
    return points


def write_md(points, path):
    tasks = list(points[0]["tasks"]) if points else []
    head = "| step | samples | training min | loss | success (episode-weighted) | 95% interval | " + \
        " | ".join(t.replace("-v3", "") for t in tasks) + " |"
    lines = [head, "|" + "---|" * (6 + len(tasks))]
    for p in points:
        per = " | ".join(f"{s}/{e}" for s, e in p["tasks"].values())
        loss = f"{p['loss']:.3f}" if p["loss"] is not None else "-"
        lines.append(
            f"| {p['step']} | {p['samples']} | {p['minutes']:.1f} | {loss} | "
            f"{100 * p['success']:.1f}% | {100 * p['ci'][0]:.1f}-{100 * p['ci'][1]:.1f}% | {per} |")
    path.write_text("\n".join(lines) + "\n")


def write_svg(points, metrics, path, title):
    w, h, l, r, t, b = 640, 360, 60, 60, 40, 50
    pw, ph = w - l - r, h - t - b
    tmax = max([p["minutes"] for p in points] + [training_seconds(metrics, max(metrics)) / 60.0, 1e-9])
    x = lambda m: l + pw * m / tmax
    y = lambda s: t + ph * (1.0 - s)
    losses = [(training_seconds(metrics, s) / 60.0, metrics[s]["loss"]) for s in sorted(metrics)]
    lmax = max((v for _, v in losses), default=1.0) or 1.0
    yl = lambda v: t + ph * (1.0 - v / lmax)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{l}" y1="{t + ph}" x2="{l + pw}" y2="{t + ph}" stroke="black"/>',
           f'<line x1="{l}" y1="{t}" x2="{l}" y2="{t + ph}" stroke="black"/>',
           f'<line x1="{l + pw}" y1="{t}" x2="{l + pw}" y2="{t + ph}" stroke="#999"/>',
           f'<text x="{l + pw / 2}" y="{h - 12}" text-anchor="middle">training time (minutes, 2 cores)</text>',
           f'<text x="16" y="{t + ph / 2}" transform="rotate(-90 16 {t + ph / 2})" text-anchor="middle" fill="#1f77b4">MT success (episode-weighted)</text>',
           f'<text x="{w - 14}" y="{t + ph / 2}" transform="rotate(90 {w - 14} {t + ph / 2})" text-anchor="middle" fill="#999">training loss (L1)</text>']
    for k in range(0, 6):
        s = k / 5
        out.append(f'<text x="{l - 6}" y="{y(s) + 4}" text-anchor="end">{int(100 * s)}%</text>')
        out.append(f'<line x1="{l}" y1="{y(s)}" x2="{l + pw}" y2="{y(s)}" stroke="#eee"/>')
        out.append(f'<text x="{l + pw + 6}" y="{y(s) + 4}" fill="#999">{lmax * s:.2f}</text>')
    step = max(1, math.ceil(tmax / 8))
    for m in range(0, int(tmax) + 1, step):
        out.append(f'<text x="{x(m)}" y="{t + ph + 16}" text-anchor="middle">{m}</text>')
    if losses:
        pts = " ".join(f"{x(m):.1f},{yl(v):.1f}" for m, v in losses)
        out.append(f'<polyline points="{pts}" fill="none" stroke="#bbb" stroke-width="1"/>')
    for p in points:
        lo, hi = p["ci"]
        out.append(f'<line x1="{x(p["minutes"]):.1f}" y1="{y(lo):.1f}" x2="{x(p["minutes"]):.1f}" y2="{y(hi):.1f}" stroke="#1f77b4"/>')
    if points:
        pts = " ".join(f'{x(p["minutes"]):.1f},{y(p["success"]):.1f}' for p in points)
        out.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        for p in points:
            out.append(f'<circle cx="{x(p["minutes"]):.1f}" cy="{y(p["success"]):.1f}" r="3.5" fill="#1f77b4"/>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="run directory of tools/metaworld/train_default.sh")
    ap.add_argument("--batch", type=int, default=32, help="samples per optimizer step")
    a = ap.parse_args()
    metrics = read_metrics(a.run / "train" / "metrics.jsonl")
    curve = a.run / "curve"
    if not curve.is_dir():
        fail(f"{curve} not found: evaluate checkpoints first (train_default.sh step 6)")
    points = read_points(curve, metrics, a.batch)
    if not points:
        fail(f"no complete evaluations under {curve}")
    write_md(points, curve / "curve.md")
    write_svg(points, metrics, curve / "curve.svg", f"Success against training time: {a.run.name}")
    print((curve / "curve.md").read_text(), end="")
    print(f"wrote {curve / 'curve.md'} and {curve / 'curve.svg'}")


if __name__ == "__main__":
    main()
