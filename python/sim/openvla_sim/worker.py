"""The simulator worker process driven by the Rust harness (`openvla eval` / `openvla sim demos`).

    python -m openvla_sim.worker

It owns one Meta-World env at a time (created inside this process; one env per process, as MuJoCo
EGL contexts neither pickle nor share well). It reads one JSON command per line on stdin and writes
one JSON answer per line on stdout; everything else it or MuJoCo prints goes to stderr.

Commands (`op`):
- `hello`: answers {"ok", "gl", "versions"}.
- `episode`: runs one evaluation episode through the policy (`policy.kind` "http": POST /act to
  `policy.url` with the inputs of `policy.inputs`; "local-expert": the scripted expert called in
  this process, the in-process baseline of the speed benchmark). Answers the outcome; a policy
  failure ends the episode as failed with its reason in `error`.
- `initial_state`: resets an episode and answers its first observation and random vector.
- `demo`: one scripted-expert demonstration, recorded (see `record_demo`).
- `quit`.

Fault injection for the harness's tests: with OPENVLA_SIM_CRASH_ONCE=<file>, the first worker that
removes that file dies (exit code 3) at step 5 of its episode, like a MuJoCo crash.
"""

import json
import os
import sys
import time
import traceback


def _versions():
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for p in ("metaworld", "mujoco", "gymnasium", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


class Worker:
    def __init__(self):
        self.env = None
        self.key = None
        self.client = None
        self.client_url = None

    def task_env(self, cmd, protocol=None):
        """The env a command asks for (task, protocol, image_size, render), kept between
        commands that ask for the same one. `protocol` overrides the command's."""
        from .sim import MetaWorldTask

        task = cmd["task"]
        protocol = protocol or cmd.get("protocol", "lerobot")
        size = int(cmd.get("image_size", 224))
        render = cmd.get("render", "fast")
        key = (task, protocol, size, render)
        if self.key != key:
            if self.env is not None:
                self.env.close()
                self.env = None
            self.env = MetaWorldTask(task, protocol, size, render)
            self.key = key
        return self.env

    def policy_client(self, url, timeout_s):
        from .client import PolicyClient

        if self.client_url != url or self.client is None:
            if self.client is not None:
                self.client.close()
            self.client = PolicyClient(url, timeout_s)
            self.client_url = url
        self.client.timeout_s = timeout_s
        return self.client

    # --- commands -------------------------------------------------------------------------------

    def initial_state(self, cmd):
        env = self.task_env(cmd)
        obs = env.reset(int(cmd["index"]), int(cmd["seed"]))
        return {"obs": obs.tolist(), "rand_vec": env.rand_vec().tolist()}

    def episode(self, cmd):
        import numpy as np

        from .client import PolicyError, PolicyInputs
        from .tasks import instruction

        task = cmd["task"]
        env = self.task_env(cmd)
        text = instruction(task)
        policy = cmd["policy"]
        kind = policy["kind"]
        execute = int(cmd.get("execute", 0))
        horizon = min(int(cmd.get("horizon", env.horizon)), env.horizon)
        record = cmd.get("record")
        blind = bool(cmd.get("blind", False))
        crash_marker = os.environ.get("OPENVLA_SIM_CRASH_ONCE")

        t_start = time.perf_counter()
        obs = env.reset(int(cmd["index"]), int(cmd["seed"]))
        rand_vec = env.rand_vec().tolist()
        if kind == "http":
            inputs = PolicyInputs.from_json(policy["inputs"])
            client = self.policy_client(policy["url"], float(policy.get("timeout_s", 60)))
            unnorm_key = policy.get("unnorm_key")
        elif kind == "local-expert":
            import metaworld.policies as mp

            expert = mp.ENV_POLICY_MAP[task]()
            inputs = PolicyInputs.from_json({"images": ["image"], "proprio_dim": None})
        else:
            raise ValueError(f"unknown policy kind {kind!r}")

        latencies, batches, frames = [], [], []
        queue = []
        success, success_step, error = False, None, None
        steps, requests, policy_s = 0, 0, 0.0
        while steps < horizon:
            if crash_marker and steps == 5:
                try:
                    os.remove(crash_marker)
                    os._exit(3)
                except FileNotFoundError:
                    pass
            images = {k: env.render(PolicyInputs.camera_for(k)) for k in inputs.images}
            if record is not None:
                frames.append(images[inputs.images[0]] if inputs.images else env.render("corner4"))
            if not queue:
                try:
                    if kind == "http":
                        sent = {k: np.zeros_like(v) for k, v in images.items()} if blind else images
                        payload = {k: _enc(v) for k, v in sent.items()}
                        payload["instruction"] = text
                        if unnorm_key:
                            payload["unnorm_key"] = unnorm_key
                        if inputs.proprio_dim:
                            payload["state"] = _enc(np.asarray(obs[:4], dtype=np.float64))
                        if inputs.privileged:
                            payload["privileged_obs"] = _enc(np.asarray(obs, dtype=np.float64))
                            payload["task"] = task
                            payload["episode_seed"] = int(cmd["seed"])
                            payload["step"] = steps
                        chunk, latency, batch = client.act(payload)
                        latencies.append(latency * 1e3)
                        policy_s += latency
                        if batch is not None:
                            batches.append(batch)
                    else:
                        t0 = time.perf_counter()
                        chunk = np.asarray(expert.get_action(obs), dtype=np.float64)[None, :]
                        latency = time.perf_counter() - t0
                        latencies.append(latency * 1e3)
                        policy_s += latency
                    requests += 1
                except PolicyError as e:
                    error = f"policy: {e}"
                    break
                if chunk.shape[1] != 4:
                    error = f"policy: the action has dimension {chunk.shape[1]}; Meta-World takes 4 (dx, dy, dz, gripper)"
                    break
                if not np.all(np.isfinite(chunk)):
                    error = "policy: the action holds NaN or infinity"
                    break
                # --execute K runs K actions of a chunk; by default the whole chunk, up to 8.
                n = chunk.shape[0]
                queue = list(chunk[: min(n, 8) if execute <= 0 else min(execute, n)])
            action = queue.pop(0)
            obs, succ, truncated = env.step(action)
            steps += 1
            if succ:
                success, success_step = True, steps
                break
            if truncated:
                break
        wall = time.perf_counter() - t_start
        out = {
            "success": success,
            "steps": steps,
            "success_step": success_step,
            "requests": requests,
            "latencies_ms": latencies,
            "batch_sizes": batches,
            "wall_s": wall,
            "policy_s": policy_s,
            "rand_vec": rand_vec,
            "error": error,
        }
        if record is not None and frames:
            from .media import contact_sheet, write_mp4

            label = f"{task}: {text}"
            try:
                write_mp4(frames, record["mp4"], fps=int(record.get("fps", 80)), label=label, success_step=success_step)
                contact_sheet(frames, record["png"], label=label, success_step=success_step)
            except Exception as e:  # the episode's outcome stands; the harness reports the media error
                out["media_error"] = f"{type(e).__name__}: {e}"
        return out

    def demo(self, cmd):
        from .lerobot_v3 import record_demo

        env = self.task_env(cmd, protocol="lerobot")
        return record_demo(env, cmd)

    def handle(self, cmd):
        op = cmd.get("op")
        if op == "hello":
            return {"gl": os.environ.get("MUJOCO_GL"), "versions": _versions(), "pid": os.getpid()}
        if op == "episode":
            return self.episode(cmd)
        if op == "initial_state":
            return self.initial_state(cmd)
        if op == "demo":
            return self.demo(cmd)
        raise ValueError(f"unknown op {op!r}")


def _enc(a):
    from .client import encode_array

    return encode_array(a)


def main():
    # Keep stdout for the protocol only: MuJoCo, warnings and prints go to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import warnings

    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
    from .gl import ensure_headless_gl

    try:
        ensure_headless_gl()
    except Exception as e:
        proto.write(json.dumps({"ok": False, "fatal": True, "error": str(e)}) + "\n")
        proto.flush()
        os._exit(2)
    worker = Worker()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
        except ValueError as e:
            proto.write(json.dumps({"ok": False, "error": f"bad command: {e}"}) + "\n")
            continue
        if cmd.get("op") == "quit":
            break
        try:
            ans = worker.handle(cmd)
            ans["ok"] = True
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            ans = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        ans["id"] = cmd.get("id")
        proto.write(json.dumps(ans) + "\n")
        proto.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: MuJoCo's EGL destructors complain at exit.
    os._exit(0)


if __name__ == "__main__":
    main()
