"""What the Python call adds over the Rust call: openvla_rs.Policy.predict_action vs the engine.

    .venv/bin/python python/bench_overhead.py [--model models/openvla-tiny] [--runs 200]

Both sides run the same observation on the same loaded policy, alternately, in the same
process: ``Policy._bench_engine`` times the engine call inside Rust (no conversion, no GIL
handling, no numpy result); ``predict_action`` is timed from Python with a PIL image and with a
numpy array. Prints one JSON object; the overhead is the difference of the medians.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

import openvla_rs

REPO = Path(__file__).resolve().parents[1]


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
    for _ in range(5):
        policy.predict_action(array, a.instruction, a.unnorm_key)
    rust, py_numpy, py_pil = [], [], []
    for _ in range(a.runs):
        rust.append(policy._bench_engine(array, a.instruction, a.unnorm_key, 1))
        t0 = time.perf_counter()
        policy.predict_action(array, a.instruction, a.unnorm_key)
        py_numpy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        policy.predict_action(pil, a.instruction, a.unnorm_key)
        py_pil.append(time.perf_counter() - t0)
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    report = {
        "model": a.model,
        "image_wh": list(pil.size),
        "runs": a.runs,
        "rust_call_ms": med(rust),
        "python_numpy_call_ms": med(py_numpy),
        "python_pil_call_ms": med(py_pil),
        "overhead_numpy_ms": med(py_numpy) - med(rust),
        "overhead_pil_ms": med(py_pil) - med(rust),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
