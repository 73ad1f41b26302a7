"""Does a trained policy look at the goal, or copy its own motion? (issue 15 diagnostic)

Sends frame F of the first N episodes of a recorded demo dataset (`openvla sim demos metaworld`)
through `openvla predict` with that frame's state, and prints the sum of the policy's chunk
(xyz) beside the sum of the demonstration's next actions and the episode's goal. At frame 0 every
episode of a task starts from the same hand position, so only the image says where the goal is:
a policy whose frame-0 chunks are all alike ignores the image, even when it matches the demos a
few frames later (where how far the hand has moved already tells the goal).

  .venv/bin/python tools/metaworld/shortcut_check.py --demos RUN/demos --model RUN/train/model \\
      --frame 0 --episodes 8
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", required=True, help="LeRobot v3 dataset written by `openvla sim demos metaworld`")
    p.add_argument("--model", required=True, help="model directory (`openvla predict --model`)")
    p.add_argument("--frame", type=int, default=0, help="frame index within each episode")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--openvla", default="target/release/openvla")
    args = p.parse_args()
    import pyarrow.parquet as pq
    from openvla_sim.lerobot_v3 import read_columns, video_path

    root = Path(args.demos)
    keys = ["episode_index", "task_index", "observation.state", "action", "observation.environment_state"]
    try:
        col = read_columns(root, keys)
    except ValueError as e:
        sys.exit(str(e))
    tasks = dict(zip(*[pq.read_table(root / "meta" / "tasks.parquet").column(k).to_pylist()
                       for k in ("task_index", "task")]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in range(args.episodes):
            m = col["episode_index"] == ep
            if m.sum() <= args.frame:
                sys.exit(f"episode {ep} has {m.sum()} frames; --frame {args.frame} is past its end")
            state = col["observation.state"][m][args.frame]
            demo = col["action"][m][args.frame:args.frame + 8, :3].sum(0)
            goal = col["observation.environment_state"][m][0][3:6]
            instruction = tasks[int(col["task_index"][m][0])]
            video = video_path(root, ep)
            png = Path(tmp) / f"{ep}.png"
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(video), "-vf",
                            f"select=eq(n\\,{args.frame})", "-frames:v", "1", str(png)], check=True)
            out = subprocess.run([args.openvla, "predict", "--model", args.model, "--image", str(png),
                                  "--instruction", instruction, "--proprio=" + ",".join(map(str, state)),
                                  "--json"], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"openvla predict failed on episode {ep}: {out.stderr.strip()}")
            policy = np.asarray(json.loads(out.stdout)["actions"])[:8, :3].sum(0)
            rows.append((ep, goal, policy, demo))
    print(f"frame {args.frame}: sums of the 8-step chunk's xyz actions")
    print("| episode | goal xyz (m) | policy | demonstration |")
    print("|---|---|---|---|")
    for ep, goal, policy, demo in rows:
        f = lambda v, d: "(" + ", ".join(f"{x:.{d}f}" for x in v) + ")"  # noqa: E731
        print(f"| {ep} | {f(goal, 3)} | {f(policy, 2)} | {f(demo, 2)} |")
    pol = np.stack([r[2] for r in rows])
    dem = np.stack([r[3] for r in rows])
    print(f"spread across episodes (std of each axis): policy {np.round(pol.std(0), 2).tolist()}, "
          f"demonstrations {np.round(dem.std(0), 2).tolist()}; "
          f"mean |policy - demonstration| {np.abs(pol - dem).mean():.2f}")


if __name__ == "__main__":
    main()
