"""Scripted experts and a random policy behind the routes of `openvla serve`, so the harness checks
itself through the very loop a model runs in.

    python -m openvla_sim.policy_server --policy expert|random [--port 0] [--seed S]

- GET /metadata: {"variant": "metaworld-expert" | "random", "family": "openvla", "inputs":
  {"images": ["image"] (or [] with --images none), "proprio_dim": 4}, "chunk_size": 1, "action_dims": {"metaworld": 4},
  "privileged_obs": true}. `privileged_obs` tells the workers to add the full 39-D observation
  (`privileged_obs`, json-numpy), the task name (`task`), the episode seed (`episode_seed`) and the
  step (`step`) to each request: the scripted experts act on object and goal positions, which no
  camera-only policy gets. The image, state and instruction are sent (and decoded) as for a model,
  so the transport cost is the same.
- POST /act: one json-numpy float64 action [4] (deploy.py's answer). The expert is
  `metaworld.policies.ENV_POLICY_MAP[task]().get_action(obs)`; the random policy draws
  uniform [-1, 1]^4 from a generator seeded by (seed, episode_seed, step), so runs repeat.
- GET /health.
Errors answer {"error", "detail"} with a 4xx status, as `openvla serve` does. Prints
"listening on http://127.0.0.1:PORT" on stderr once ready.
"""

import argparse
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .client import decode_array, encode_array
from .tasks import DESCRIPTIONS


class _Policy:
    def __init__(self, kind, seed, images=True):
        self.kind = kind
        self.seed = seed
        self.images = images
        self.experts = {}
        self.lock = threading.Lock()

    def metadata(self):
        return {
            "variant": "metaworld-expert" if self.kind == "expert" else "random",
            "family": "openvla",
            "model_dir": "metaworld.policies (scripted experts)" if self.kind == "expert" else f"random (seed {self.seed})",
            "inputs": {"images": ["image"] if self.images else [], "proprio_dim": 4},
            "chunk_size": 1,
            "action_dims": {"metaworld": 4},
            "privileged_obs": True,
        }

    def act(self, req):
        for key in ("image",) * self.images + ("instruction", "privileged_obs", "task"):
            if key not in req:
                raise ValueError(f"missing key {key!r} (this server needs the privileged observation)")
        if self.images:
            image = decode_array(req["image"])
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image must be HxWx3, got shape {list(image.shape)}")
        task = req["task"]
        if task not in DESCRIPTIONS:
            raise ValueError(f"unknown task {task!r}")
        obs = decode_array(req["privileged_obs"])
        if self.kind == "random":
            rng = np.random.default_rng([self.seed, int(req.get("episode_seed", 0)), int(req.get("step", 0))])
            return rng.uniform(-1.0, 1.0, size=4)
        with self.lock:
            expert = self.experts.get(task)
            if expert is None:
                import metaworld.policies as mp

                expert = self.experts[task] = mp.ENV_POLICY_MAP[task]()
        return np.asarray(expert.get_action(obs), dtype=np.float64)


def make_handler(policy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args):
            pass

        def _send(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-openvla-batch-size", "1")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/metadata":
                self._send(200, policy.metadata())
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not_found", "detail": f"no route {self.path}"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path != "/act":
                self._send(404, {"error": "not_found", "detail": f"no route {self.path}"})
                return
            try:
                action = policy.act(json.loads(body))
            except Exception as e:  # a bad request, answered like openvla serve does
                self._send(400, {"error": "bad_request", "detail": f"{type(e).__name__}: {e}"})
                return
            self._send(200, encode_array(np.asarray(action, dtype=np.float64)))

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", choices=["expert", "random"], required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", choices=["image", "none"], default="image",
                    help="declare the camera image as an input (default; the workers render and send it "
                         "as for a model) or none (no rendering: the policies do not look at it)")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
    server = ThreadingHTTPServer((args.host, args.port), make_handler(_Policy(args.policy, args.seed, args.images == "image")))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"openvla_sim.policy_server ({args.policy}): listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
