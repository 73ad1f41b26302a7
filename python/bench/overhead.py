"""What the Python call adds over the Rust call: openvla_rs.Policy.predict_action vs the engine.

    .venv/bin/python python/bench/overhead.py [--model models/openvla-tiny] [--runs 200]

Each timed call is ``Policy._timed_predict_action``, the same path as ``predict_action``
(argument parsing, image conversion, GIL release, engine, numpy result), which also reports
the seconds spent inside the engine call. The overhead of a call is its wall time from Python
minus its own engine time, so the engine's run-to-run variation cancels. Prints one JSON
object (medians and 90th percentiles, in milliseconds) for a numpy image and a PIL image.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

import openvla_rs

REPO = Path(__file__).resolve().parents[2]


def summary(xs):
    xs = sorted(xs)
    return {"median_ms": statistics.median(xs) * 1e3, "p90_ms": xs[int(0.9 * (len(xs) - 1))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "openvla-tiny"))
    ap.add_argument("--image", default=str(REPO / "testdata" / "openvla-tiny" / "s0_image.png"))
    ap.add_argument("--instruction", default="pick up the red block")
    ap.add_argument("--unnorm-key", default="fake_bridge_orig")
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    policy = openvla_rs.Policy.from_pretrained(a.model)
    pil = Image.open(a.image)
    pil.load()
    array = np.asarray(pil.convert("RGB"))
    for _ in range(3):
        policy.predict_action(array, a.instruction, a.unnorm_key)
    report = {"model": a.model, "image_wh": list(pil.size), "runs": a.runs}
    for name, image in [("numpy", array), ("pil", pil)]:
        engine, overhead = [], []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            _, engine_s = policy._timed_predict_action(image, a.instruction, a.unnorm_key)
            total = time.perf_counter() - t0
            engine.append(engine_s)
            overhead.append(total - engine_s)
        report[name] = {"engine_call": summary(engine), "python_overhead": summary(overhead)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
