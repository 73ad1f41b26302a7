"""Manual check (not run in CI): the `lerobot` package's own LeRobotDataset loads a demo dataset
written by `openvla sim demos metaworld`, and its frames, states, actions and tasks match ours.

    # a separate venv with lerobot (heavy: torch), e.g. the one tools/data/setup-venvs.sh makes:
    PYTHONPATH=python/sim .venv-data/lerobot/bin/python -m openvla_sim.check_lerobot DATASET_DIR

Exits non-zero, naming the first difference, if anything does not match.
"""

import json
import sys
from pathlib import Path

import numpy as np


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = Path(sys.argv[1]).resolve()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("openvla-rs/metaworld-demos", root=root)
    info = json.loads((root / "meta" / "info.json").read_text())
    import pyarrow.parquet as pq

    table = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").to_pydict()
    tasks = pq.read_table(root / "meta" / "tasks.parquet").to_pydict()
    if len(ds) != info["total_frames"]:
        sys.exit(f"lerobot sees {len(ds)} frames, info.json says {info['total_frames']}")
    worst = 0.0
    for i in range(len(ds)):
        item = ds[i]
        for k in ("observation.state", "action"):
            if not np.allclose(item[k].numpy(), np.asarray(table[k][i], dtype=np.float32)):
                sys.exit(f"frame {i}: {k} differs")
        if item["task"] != tasks["task"][table["task_index"][i]]:
            sys.exit(f"frame {i}: task {item['task']!r} differs")
        img = item["observation.image"].numpy()
        if img.shape != (3, info["features"]["observation.image"]["shape"][0],
                         info["features"]["observation.image"]["shape"][1]):
            sys.exit(f"frame {i}: image shape {img.shape}")
        worst = max(worst, float(img.max()))
    print(f"ok: lerobot LeRobotDataset loads {len(ds)} frames of {ds.num_episodes} episodes; "
          f"states, actions and tasks match the parquet (max pixel {worst:.3f})")


if __name__ == "__main__":
    main()
