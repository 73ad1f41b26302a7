"""openpi's own client (the openpi-client package from PyPI) against `openvla serve --protocol both`.

openpi-client 0.1.2's websocket_client_policy.py, msgpack_numpy.py and base_policy.py are the
same code as Physical-Intelligence/openpi's packages/openpi-client, except that the repository's
client retries while the server is not up yet (checked when this test was written).
"""

import base64
import json
import re
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import MODEL, openvla_bin

# Installed by python/build.sh (pinned there); a missing package fails the test run.
from openpi_client import msgpack_numpy, websocket_client_policy

KEY = "fake_bridge_orig"


@pytest.fixture(scope="module")
def server():
    """`openvla serve --protocol both` on free loopback ports; yields (rest_url, ws_port)."""
    proc = subprocess.Popen(
        [
            str(openvla_bin()),
            "serve",
            "--model",
            str(MODEL),
            "--port",
            "0",
            "--protocol",
            "both",
            "--openpi-port",
            "0",
            "--openpi-unnorm-key",
            KEY,
            "--no-warmup",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    rest = ws = None
    lines = []
    deadline = time.monotonic() + 120
    while (rest is None or ws is None) and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            rest = m.group(1)
        m = re.search(r"openpi websocket listening on ws://\S+:(\d+)", line)
        if m:
            ws = int(m.group(1))
    if rest is None or ws is None:
        proc.kill()
        pytest.fail("openvla serve did not start:\n" + "".join(lines))
    # Keep draining stderr so the server never blocks on a full pipe.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    yield f"http://{rest}", ws
    proc.terminate()
    proc.wait(timeout=30)


def act(url, image, instruction, unnorm_key):
    """POST /act as a deploy.py client (json-numpy image), returning the action."""
    body = {
        "image": {
            "__numpy__": base64.b64encode(image.tobytes()).decode(),
            "dtype": "|u1",
            "shape": list(image.shape),
        },
        "instruction": instruction,
        "unnorm_key": unnorm_key,
    }
    req = urllib.request.Request(url + "/act", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        a = json.loads(r.read())
    return np.frombuffer(base64.b64decode(a["__numpy__"]), dtype=a["dtype"]).reshape(a["shape"])


def observation(image, prompt):
    return {
        "observation/image": image,
        "observation/wrist_image": image,
        "observation/state": np.zeros(8, np.float32),
        "prompt": prompt,
    }


def test_healthz(server):
    _, port = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        assert r.status == 200
        assert r.read() == b"OK\n"


def test_metadata_comes_first(server):
    _, port = server
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    meta = client.get_server_metadata()
    assert meta["server"] == "openvla-rs" and meta["protocol"] == "openpi"
    assert meta["family"] == "openvla" and meta["chunk_size"] == 1
    assert meta["default_unnorm_key"] == KEY
    assert KEY in meta["unnorm_keys"]
    assert meta["keys"]["prompt"] == "prompt"


def test_actions_equal_act(server, samples):
    url, port = server
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    for i, s in enumerate(samples):
        image = np.asarray(Image.open(s["image"]).convert("RGB"))
        out = client.infer(observation(image, s["instruction"]) | {"unnorm_key": s["unnorm_key"]})
        actions = out["actions"]
        assert isinstance(actions, np.ndarray) and actions.dtype == np.float64
        assert actions.shape[0] == 1
        expected = act(url, image, s["instruction"], s["unnorm_key"])
        np.testing.assert_array_equal(actions[0], expected)
        timing = out["server_timing"]
        assert timing["infer_ms"] > 0
        # prev_total_ms: from the second step on (it includes the previous send).
        assert ("prev_total_ms" in timing) == (i > 0)


def test_default_unnorm_key_and_numpy_scalars(server, samples):
    url, port = server
    s = samples[0]
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    image = np.asarray(Image.open(s["image"]).convert("RGB"))
    out = client.infer(observation(image, np.str_(s["instruction"])))
    np.testing.assert_array_equal(out["actions"][0], act(url, image, s["instruction"], KEY))


def test_bad_messages_get_an_error_and_the_server_stays_up(server, samples):
    url, port = server
    s = samples[0]
    image = np.asarray(Image.open(s["image"]).convert("RGB"))
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    bad = [
        ({"prompt": "x"}, "observation/image"),
        ({"observation/image": image}, "prompt"),
        (observation(image.astype(np.float32), "x"), "uint8"),
        (observation(image[:, :, :2].copy(), "x"), "HxWx3"),
        (observation(image, "x") | {"unnorm_key": "nope"}, "nope"),
        (observation(image, ""), "instruction"),
    ]
    for obs, word in bad:
        with pytest.raises(RuntimeError) as e:
            client.infer(obs)
        assert word in str(e.value), (word, str(e.value))
    # Not msgpack, and a text frame, on the same connection.
    client._ws.send(b"\xc1 not msgpack")
    reply = client._ws.recv()
    assert isinstance(reply, str) and "not msgpack" in reply
    client._ws.send("hello")
    reply = client._ws.recv()
    assert isinstance(reply, str) and "binary" in reply
    # The same connection, and the server, still answer.
    out = client.infer(observation(image, s["instruction"]))
    np.testing.assert_array_equal(out["actions"][0], act(url, image, s["instruction"], KEY))
    packed = msgpack_numpy.packb(observation(image, s["instruction"]))
    client._ws.send(packed)
    assert not isinstance(client._ws.recv(), str)
