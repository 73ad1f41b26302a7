"""Scripted-expert demonstrations, written as a LeRobot v3 dataset (`openvla sim demos metaworld`).

Recording (`record_demo`, run in a worker): the evaluation's camera (corner4, rotated 180 degrees,
fast render settings), image size, state (obs[:4]) and instruction (LeRobot's description). Per
frame: the image the policy would see, the state, the environment state (object and goal
positions, `observation.environment_state`: training targets only, never a policy input), and
the expert's action clipped to [-1, 1]; then the env steps (with `action_noise`, the executed
action is that one plus Gaussian xyz noise, DART-style; the recorded one stays clean). With
`start_steps`, the hand first moves, unrecorded, in one random direction for a random number of
steps in 0..=start_steps, so that episodes start from random hand positions (both drawn from
the episode's seed). The episode ends `extra_steps` steps after the first success (or at the
horizon); a failed episode is dropped (the caller counts it).

Initial conditions are disjoint from evaluation: demo episode seeds are DEMO_SEED_BASE + n
(evaluation seeds must stay below DEMO_SEED_BASE; `openvla eval` refuses others), and each demo's
random vector is checked against the benchmark's 50 fixed goals of its task (protocol metaworld);
a demo that equals one is refused.

Layout written by `assemble` (LeRobot codebase v3.0):
    meta/info.json, meta/stats.json, meta/tasks.parquet, meta/episodes/chunk-000/file-000.parquet,
    data/chunk-000/file-000.parquet, videos/observation.image/chunk-CCC/file-FFF.mp4
One MP4 per episode (file index = episode % 1000, chunk = episode // 1000, from_timestamp 0),
H.264; `lossless` encodes libx264rgb -qp 0 (exact RGB, for tests).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from .sim import DEMO_SEED_BASE, benchmark_goals
from .tasks import instruction

FPS = 80
IMAGE_KEY = "observation.image"
ENV_STATE_KEY = "observation.environment_state"
ENV_STATE_NAMES = ["object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z"]
_GOALS = {}


def _encode(frames, path, lossless):
    h, w = frames[0].shape[:2]
    codec = ["-c:v", "libx264rgb", "-qp", "0", "-pix_fmt", "rgb24"] if lossless else \
        ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-g", "8"]
    cmd = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(FPS), "-i", "-", *codec, "-r", str(FPS), str(path)]
    try:
        p = subprocess.run(cmd, input=np.stack(frames).tobytes(), stderr=subprocess.PIPE)
    except OSError as e:
        raise RuntimeError(f"cannot run ffmpeg ({e}); install it (tools/setup.sh does)") from e
    if p.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {p.stderr.decode(errors='replace')[-500:]}")


def record_demo(env, cmd):
    """One expert episode on `env` (a MetaWorldTask, protocol lerobot). See the module doc."""
    import metaworld.policies as mp

    task = cmd["task"]
    seed = int(cmd["seed"])
    if seed < DEMO_SEED_BASE:
        raise ValueError(f"demo seed {seed} is below {DEMO_SEED_BASE}, the range kept for evaluation")
    extra = int(cmd.get("extra_steps", 10))
    staging = Path(cmd["staging"])
    key = cmd["key"]
    obs = env.reset(0, seed)
    goals = _GOALS.get(task)
    if goals is None:
        goals = _GOALS[task] = benchmark_goals(task)
    if np.any(np.all(np.abs(goals - env.rand_vec()[None, :]) < 1e-9, axis=1)):
        raise ValueError(f"demo seed {seed} of {task} reproduces one of the benchmark's 50 goals")
    expert = mp.ENV_POLICY_MAP[task]()
    # Unrecorded random start and DART noise, both drawn from the episode's seed.
    rng = np.random.default_rng(seed)
    start_steps = int(cmd.get("start_steps", 0))
    noise = float(cmd.get("action_noise", 0.0))
    moved = int(rng.integers(0, start_steps + 1)) if start_steps > 0 else 0
    direction = rng.uniform(-1.0, 1.0, 3)
    for _ in range(moved):
        obs, _, _ = env.step(np.array([*direction, 0.0]))
    frames, states, env_states, actions = [], [], [], []
    success_step = None
    for t in range(env.horizon - moved):
        frames.append(env.render("corner4"))
        states.append(np.asarray(obs[:4], dtype=np.float32))
        env_states.append(env.environment_state(obs))
        a = np.clip(np.asarray(expert.get_action(obs), dtype=np.float64), -1.0, 1.0)
        actions.append(a.astype(np.float32))
        if noise > 0:
            a = np.clip(a + np.concatenate([rng.normal(0.0, noise, 3), [0.0]]), -1.0, 1.0)
        obs, succ, truncated = env.step(a)
        if succ and success_step is None:
            success_step = t + 1
        if success_step is not None and t + 1 >= success_step + extra:
            break
        if truncated:
            break
    if success_step is None:
        return {"success": False, "length": len(frames)}
    staging.mkdir(parents=True, exist_ok=True)
    frames_arr = np.stack(frames)
    _encode(frames, staging / f"{key}.mp4", bool(cmd.get("lossless", False)))
    np.savez(staging / f"{key}.npz", state=np.stack(states), env_state=np.stack(env_states),
             action=np.stack(actions))
    if cmd.get("save_raw"):
        frames_arr.tofile(staging / f"{key}.rgb")
        (staging / f"{key}.json").write_text(json.dumps({
            "task": task, "seed": seed, "shape": list(frames_arr.shape),
            "state": np.stack(states).tolist(), "env_state": np.stack(env_states).tolist(),
            "action": np.stack(actions).tolist()}))
    px = frames_arr.reshape(-1, 3).astype(np.float64) / 255.0
    return {
        "success": True,
        "length": len(frames),
        "success_step": success_step,
        "rand_vec": env.rand_vec().tolist(),
        "image_stats": {"min": px.min(0).tolist(), "max": px.max(0).tolist(), "sum": px.sum(0).tolist(),
                        "sumsq": (px * px).sum(0).tolist(), "count": int(px.shape[0]), "frames": len(frames)},
    }


def _stats(x):
    x = np.asarray(x, dtype=np.float64)
    q = lambda p: np.quantile(x, p, axis=0).tolist()  # noqa: E731
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
            "count": [int(x.shape[0])], "q01": q(0.01), "q10": q(0.10), "q50": q(0.5), "q90": q(0.9), "q99": q(0.99)}


def video_path(root, episode: int) -> Path:
    """Where `assemble` puts `episode`'s MP4 under the dataset `root` (one file per episode)."""
    return Path(root) / "videos" / IMAGE_KEY / f"chunk-{episode // 1000:03d}" / f"file-{episode % 1000:03d}.mp4"


def read_columns(root, keys):
    """The columns `keys` of a dataset written by `assemble`, as numpy arrays (a row a frame);
    a clear error names the keys the dataset lacks."""
    import pyarrow.parquet as pq

    root = Path(root)
    tables = [pq.read_table(f) for f in sorted((root / "data").glob("chunk-*/file-*.parquet"))]
    if not tables:
        raise ValueError(f"{root}: no data/chunk-*/file-*.parquet (expected a LeRobot v3 dataset)")
    missing = [k for k in keys if k not in tables[0].column_names]
    if missing:
        raise ValueError(f"{root}: no column {missing} (record with `openvla sim demos metaworld`)")
    return {k: np.concatenate([np.asarray(t.column(k).to_pylist()) for t in tables]) for k in keys}


def _load_npz(path):
    """The arrays of an `.npz`, read into memory (the file is closed again: thousands of
    episodes must not hold thousands of open files)."""
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def assemble(staging: Path, out: Path, manifest: dict):
    """Writes the dataset from the recorded episodes listed in `manifest["episodes"]` (in order;
    each {"key", "task", "length", "image_stats"}); moves their MP4s into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    eps = manifest["episodes"]
    if not eps:
        raise ValueError("no successful demonstration to write")
    size = int(manifest["image_size"])
    tasks = []
    for e in eps:
        if instruction(e["task"]) not in tasks:
            tasks.append(instruction(e["task"]))
    (out / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    (out / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
    cols = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                            "task_index")}
    ep_rows = []
    arrays = [_load_npz(staging / f"{e['key']}.npz") for e in eps]
    # Staging from a recorder that predates the environment state: the column is written only
    # when every episode has it.
    with_env = all("env_state" in d for d in arrays)
    if with_env:
        cols[ENV_STATE_KEY] = []
    start = 0
    img = {"min": np.full(3, np.inf), "max": np.full(3, -np.inf), "sum": np.zeros(3), "sumsq": np.zeros(3), "count": 0}
    for n, (e, d) in enumerate(zip(eps, arrays)):
        length = int(d["state"].shape[0])
        if length != int(e["length"]):
            raise ValueError(f"episode {e['key']}: {length} frames recorded, {e['length']} announced")
        ti = tasks.index(instruction(e["task"]))
        cols["observation.state"].append(d["state"].astype(np.float32))
        cols["action"].append(d["action"].astype(np.float32))
        if with_env:
            cols[ENV_STATE_KEY].append(d["env_state"].astype(np.float32))
        cols["timestamp"].append((np.arange(length) / FPS).astype(np.float32))
        cols["frame_index"].append(np.arange(length, dtype=np.int64))
        cols["episode_index"].append(np.full(length, n, dtype=np.int64))
        cols["index"].append(np.arange(start, start + length, dtype=np.int64))
        cols["task_index"].append(np.full(length, ti, dtype=np.int64))
        chunk, file = n // 1000, n % 1000
        dest = video_path(out, n)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / f"{e['key']}.mp4"), dest)
        ep_rows.append({
            "episode_index": n, "tasks": [tasks[ti]], "length": length,
            "data/chunk_index": 0, "data/file_index": 0,
            "dataset_from_index": start, "dataset_to_index": start + length,
            f"videos/{IMAGE_KEY}/chunk_index": chunk, f"videos/{IMAGE_KEY}/file_index": file,
            f"videos/{IMAGE_KEY}/from_timestamp": 0.0, f"videos/{IMAGE_KEY}/to_timestamp": length / FPS,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
        })
        s = e["image_stats"]
        img["min"] = np.minimum(img["min"], s["min"])
        img["max"] = np.maximum(img["max"], s["max"])
        img["sum"] += np.asarray(s["sum"])
        img["sumsq"] += np.asarray(s["sumsq"])
        img["count"] += int(s["count"])
        start += length
    full = {k: np.concatenate(v) for k, v in cols.items()}

    def fsl(a, dim):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=pa.float32()), dim)

    columns = {
        "observation.state": fsl(full["observation.state"], 4),
        "action": fsl(full["action"], 4),
        "timestamp": pa.array(full["timestamp"], type=pa.float32()),
        "frame_index": pa.array(full["frame_index"]),
        "episode_index": pa.array(full["episode_index"]),
        "index": pa.array(full["index"]),
        "task_index": pa.array(full["task_index"]),
    }
    if with_env:
        columns[ENV_STATE_KEY] = fsl(full[ENV_STATE_KEY], len(ENV_STATE_NAMES))
    table = pa.table(columns)
    pq.write_table(table, out / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.Table.from_pylist(ep_rows), out / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task_index": pa.array(range(len(tasks)), type=pa.int64()), "task": tasks}),
                   out / "meta" / "tasks.parquet")

    stats = {k: _stats(full[k].reshape(len(full[k]), -1)) for k in cols}
    mean = img["sum"] / img["count"]
    std = np.sqrt(np.maximum(img["sumsq"] / img["count"] - mean * mean, 0.0))
    c3 = lambda v: [[[float(x)]] for x in v]  # noqa: E731
    stats[IMAGE_KEY] = {"min": c3(img["min"]), "max": c3(img["max"]), "mean": c3(mean), "std": c3(std),
                        "count": [int(sum(e["length"] for e in eps))]}
    (out / "meta" / "stats.json").write_text(json.dumps(stats, indent=1))

    features = {
        IMAGE_KEY: {
            "dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": size, "video.width": size, "video.codec": "h264",
                     "video.pix_fmt": "rgb24" if manifest.get("lossless", False) else "yuv420p",
                     "video.fps": FPS, "video.channels": 3, "has_audio": False, "is_depth_map": False},
        },
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["hand_x", "hand_y", "hand_z", "gripper"]},
    }
    if with_env:
        features[ENV_STATE_KEY] = {"dtype": "float32", "shape": [len(ENV_STATE_NAMES)], "names": ENV_STATE_NAMES}
    scalar = lambda dt: {"dtype": dt, "shape": [1], "names": None}  # noqa: E731
    info = {
        "codebase_version": "v3.0",
        "robot_type": "sawyer",
        "total_episodes": len(eps),
        "total_frames": int(start),
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": FPS,
        "splits": {"train": f"0:{len(eps)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            **features,
            "action": {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "gripper"]},
            "timestamp": scalar("float32"),
            "frame_index": scalar("int64"),
            "episode_index": scalar("int64"),
            "index": scalar("int64"),
            "task_index": scalar("int64"),
        },
        "openvla_sim": manifest.get("provenance", {}),
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=4))


def main():
    ap = argparse.ArgumentParser(description="Assemble recorded demonstrations into a LeRobot v3 dataset")
    ap.add_argument("command", choices=["assemble"])
    ap.add_argument("--staging", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    a = ap.parse_args()
    try:
        assemble(a.staging, a.out, json.loads(a.manifest.read_text()))
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
