#!/usr/bin/env python3
"""A robot-style client of `openvla serve`, written the way deploy.py clients are.

It uses only what deploy.py's docstring tells a client to install (requests, json-numpy; Pillow
to read the images), calls `json_numpy.patch()` and `requests.post(url, json={...}).json()`,
and checks that every action equals what `openvla predict --json` prints for the same image,
instruction and unnorm_key, bit for bit. It covers the json-numpy image, deploy.py's
double-encoded form, a base64 PNG string, concurrent requests (batched by the server), and the
error replies.

    .venv/bin/python tools/client/test_deploy_client.py --url http://127.0.0.1:8000 \
        --openvla target/release/openvla --model models/openvla-tiny \
        --testdata testdata/openvla-tiny

Run by crates/openvla-cli/tests/serve.rs against a real server on loopback. Exits non-zero on
any failure.
"""

import argparse
import base64
import concurrent.futures
import json
import subprocess
import sys

try:
    import json_numpy
    import numpy as np
    import requests
    from PIL import Image
except ImportError as e:  # pragma: no cover
    sys.exit(
        f"missing Python package {e.name!r}: run `bash tools/setup.sh` "
        "(it installs tools/venv/client.txt into .venv)"
    )

json_numpy.patch()

TIMEOUT = 120  # seconds per request, so the test always ends


def predict(args, image_path, instruction, unnorm_key):
    out = subprocess.run(
        [
            args.openvla, "predict", "--model", args.model, "--image", image_path,
            "--instruction", instruction, "--unnorm-key", unnorm_key, "--json",
        ],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return np.array(json.loads(out.stdout)["action"], dtype=np.float64)


def load_image(path):
    return np.asarray(Image.open(path).convert("RGB"))


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name} {detail}")


def same_action(got, want):
    return (
        isinstance(got, np.ndarray)
        and got.dtype == np.float64
        and got.shape == want.shape
        and np.array_equal(got, want)
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--openvla", required=True, help="the openvla binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--testdata", required=True)
    args = ap.parse_args()
    act = args.url.rstrip("/") + "/act"
    c = Checks()

    with open(f"{args.testdata}/manifest.json") as f:
        manifest = json.load(f)
    cases = []
    for s in manifest["samples"]:
        path = f"{args.testdata}/{s['files']['image']}"
        cases.append((path, s["instruction"], s["unnorm_key"]))
    # Other prompt lengths and the 4-dimensional dataset.
    first = cases[0][0]
    cases.append((first, "go", "fake_nomask_4d"))
    cases.append((cases[1][0], "carefully put the small spoon on the folded towel next to the sink", "fake_libero_spatial"))
    want = [predict(args, *case) for case in cases]
    images = [load_image(p) for p, _, _ in cases]

    # 1. The deploy.py client, as its docstring shows it.
    for (path, ins, key), img, w in zip(cases, images, want):
        action = requests.post(
            act, json={"image": img, "instruction": ins, "unnorm_key": key}, timeout=TIMEOUT
        ).json()
        c.check(f"json-numpy {path} {key}", same_action(action, w), f"{action!r} != {w!r}")

    # 2. deploy.py's double-encoded mode: the reply is a JSON string.
    for (path, ins, key), img, w in zip(cases, images, want):
        payload = {"encoded": json.dumps({"image": img, "instruction": ins, "unnorm_key": key})}
        reply = requests.post(act, json=payload, timeout=TIMEOUT).json()
        ok = isinstance(reply, str)
        action = json.loads(reply) if ok else reply
        c.check(f"encoded {path} {key}", ok and same_action(action, w), f"{reply!r}")

    # 3. A base64 PNG string instead of an array (clients without numpy).
    for (path, ins, key), w in zip(cases, want):
        with open(path, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        action = requests.post(
            act, json={"image": b64, "instruction": ins, "unnorm_key": key}, timeout=TIMEOUT
        ).json()
        c.check(f"png {path} {key}", same_action(action, w), f"{action!r}")

    # 4. A hand-written array with the "<u1" descr of deploy.py's docstring.
    img, (path, ins, key), w = images[0], cases[0], want[0]
    arr = {"__numpy__": base64.b64encode(img.tobytes()).decode(), "dtype": "<u1", "shape": list(img.shape)}
    action = requests.post(act, json={"image": arr, "instruction": ins, "unnorm_key": key}, timeout=TIMEOUT).json()
    c.check("dtype <u1", same_action(action, w), f"{action!r}")

    # 5. Everything at once from parallel robots: batched by the server, same answers.
    def one(i):
        path, ins, key = cases[i % len(cases)]
        r = requests.post(act, json={"image": images[i % len(cases)], "instruction": ins, "unnorm_key": key}, timeout=TIMEOUT)
        return i, r.json(), r.headers.get("x-openvla-batch-size")

    n = 3 * len(cases)
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    all_equal = all(same_action(a, want[i % len(cases)]) for i, a, _ in results)
    c.check(f"{n} concurrent requests equal their single answers", all_equal)
    sizes = sorted(int(b) for _, _, b in results if b is not None)
    c.check(f"concurrent requests were batched (batch sizes {sizes})", len(sizes) == n and sizes[-1] > 1)

    # 6. Errors are status codes with a JSON body, not deploy.py's "error" string.
    r = requests.post(act, json={"image": images[0], "instruction": "x", "unnorm_key": "nope"}, timeout=TIMEOUT)
    body = r.json()
    keys_listed = all(k in body.get("detail", "") for k in ("fake_bridge_orig", "fake_libero_spatial", "fake_nomask_4d"))
    c.check("unknown unnorm_key: 400 listing the keys", r.status_code == 400 and body.get("error") == "unknown_unnorm_key" and keys_listed, f"{r.status_code} {body}")
    r = requests.post(act, json={"image": images[0]}, timeout=TIMEOUT)
    c.check("missing instruction: 422", r.status_code == 422 and r.json().get("error") == "missing_field", f"{r.status_code} {r.text}")
    r = requests.post(act, data=b"{not json", timeout=TIMEOUT)
    c.check("malformed JSON: 400", r.status_code == 400 and r.json().get("error") == "malformed_json", f"{r.status_code} {r.text}")

    # 7. Operational endpoints.
    meta = requests.get(args.url.rstrip("/") + "/metadata", timeout=TIMEOUT).json()
    c.check("metadata action dims", meta.get("action_dims") == {"fake_bridge_orig": 7, "fake_libero_spatial": 7, "fake_nomask_4d": 4}, f"{meta}")
    metrics = requests.get(args.url.rstrip("/") + "/metrics", timeout=TIMEOUT).text
    c.check("metrics", 'openvla_http_requests_total{endpoint="/act",status="200"}' in metrics and "openvla_batch_size_bucket" in metrics)

    print(f"python client: {c.passed} checks passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
