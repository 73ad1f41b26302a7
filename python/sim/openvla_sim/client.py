"""The policy client: POST /act in json-numpy (OpenVLA deploy.py's wire format) over one persistent
HTTP/1.1 connection with TCP_NODELAY (without it a request can stall ~40 ms on Nagle + delayed ACK).

What a request holds follows the server's GET /metadata (CONTRACTS.md):
- `inputs.images`: the image keys, primary first; a key containing "wrist" gets the gripperPOV
  camera, every other key the primary corner4 view. Missing: ["image"] (the 256-bin family).
- `inputs.proprio_dim`: if set, `state` = obs[:4] (hand xyz, gripper opening).
- `privileged_obs` (only the scripted-expert server sets it): the full 39-D observation, the task
  name, the episode seed and the step go along as `privileged_obs`, `task`, `episode_seed`, `step`.
The answer is one action (a json-numpy array) or a chunk (a list of them).
"""

import base64
import http.client
import json
import socket
import time
import urllib.parse

import numpy as np


class PolicyError(Exception):
    """The policy could not answer (HTTP error, refusal, timeout, malformed answer)."""


def encode_array(a: np.ndarray) -> dict:
    """json-numpy encoding (what `json_numpy.dumps` writes)."""
    a = np.ascontiguousarray(a)
    return {"__numpy__": base64.b64encode(a.tobytes()).decode("ascii"), "dtype": a.dtype.str, "shape": list(a.shape)}


def decode_array(v) -> np.ndarray:
    """A json-numpy array or a plain JSON list of numbers."""
    if isinstance(v, dict) and "__numpy__" in v:
        a = np.frombuffer(base64.b64decode(v["__numpy__"]), dtype=np.dtype(v["dtype"]))
        return a.reshape(v["shape"]).astype(np.float64)
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return np.asarray(v, dtype=np.float64)
    raise PolicyError(f"the policy's answer is not an action array: {str(v)[:200]}")


def decode_actions(body: bytes) -> np.ndarray:
    """The answer as a [K, D] chunk (K = 1 for a single action)."""
    try:
        v = json.loads(body)
    except ValueError as e:
        raise PolicyError(f"the policy's answer is not JSON ({e}): {body[:200]!r}") from None
    if isinstance(v, dict) and "__numpy__" not in v:
        raise PolicyError(f"the policy answered an object, not an action: {str(v)[:300]}")
    if isinstance(v, list) and v and not all(isinstance(x, (int, float)) for x in v):
        rows = [decode_array(x) for x in v]
    else:
        rows = [decode_array(v)]
    a = np.stack([r.reshape(-1) for r in rows]) if rows else np.zeros((0, 0))
    if a.ndim != 2 or a.shape[0] == 0:
        raise PolicyError(f"the policy answered an empty or malformed chunk of shape {a.shape}")
    return a


class _NoDelayConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PolicyClient:
    """A persistent connection to one policy server."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        u = urllib.parse.urlparse(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"policy URL {url!r}: expected http://HOST:PORT")
        self.host, self.port, self.base = u.hostname, u.port or 80, u.path.rstrip("/")
        self.timeout_s = timeout_s
        self.conn = None

    def _connection(self):
        if self.conn is None:
            self.conn = _NoDelayConnection(self.host, self.port, timeout=self.timeout_s)
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None):
        """One request; reconnects once if a kept-alive connection was closed by the server.
        Returns (status, headers, body)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, self.base + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, resp, data
            except (socket.timeout, TimeoutError) as e:
                self.close()
                raise PolicyError(f"timeout: no answer from {self.host}:{self.port}{path} within {self.timeout_s} s") from e
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.close()
                if attempt == 1:
                    raise PolicyError(f"connection to {self.host}:{self.port} failed: {e}") from e
        raise AssertionError("unreachable")

    def metadata(self) -> dict:
        status, _, data = self.request("GET", "/metadata")
        if status != 200:
            raise PolicyError(f"GET /metadata: HTTP {status}: {data[:300]!r}")
        return json.loads(data)

    def act(self, payload: dict):
        """POST /act; returns (actions [K, D], latency seconds, server batch size or None)."""
        body = json.dumps(payload).encode()
        t0 = time.perf_counter()
        status, resp, data = self.request("POST", "/act", body)
        latency = time.perf_counter() - t0
        if status != 200:
            raise PolicyError(f"POST /act: HTTP {status}: {data[:300].decode('utf-8', 'replace')}")
        actions = decode_actions(data)
        batch = resp.getheader("x-openvla-batch-size")
        return actions, latency, int(batch) if batch and batch.isdigit() else None


class PolicyInputs:
    """What the policy takes, from its /metadata (missing fields: the 256-bin defaults)."""

    def __init__(self, meta: dict):
        inputs = meta.get("inputs") or {}
        images = inputs.get("images")
        self.images = list(images) if images is not None else ["image"]
        self.proprio_dim = inputs.get("proprio_dim")
        self.chunk_size = int(meta.get("chunk_size") or 1)
        self.privileged = bool(meta.get("privileged_obs", False))

    def to_json(self) -> dict:
        return {"images": self.images, "proprio_dim": self.proprio_dim, "chunk_size": self.chunk_size,
                "privileged_obs": self.privileged}

    @staticmethod
    def from_json(d: dict) -> "PolicyInputs":
        p = PolicyInputs({})
        p.images = list(d.get("images", ["image"]))
        p.proprio_dim = d.get("proprio_dim")
        p.chunk_size = int(d.get("chunk_size", 1))
        p.privileged = bool(d.get("privileged_obs", False))
        return p

    @staticmethod
    def camera_for(key: str) -> str:
        return "gripperPOV" if "wrist" in key else "corner4"
