"""Shared fixtures: the shipped tiny model, the fixture samples, and `openvla predict --json`."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "openvla-tiny"
FIXTURE = REPO / "testdata" / "openvla-tiny"


def openvla_bin() -> Path:
    """The `openvla` binary: $OPENVLA_BIN, else the workspace's debug build."""
    path = Path(os.environ.get("OPENVLA_BIN", REPO / "target" / "debug" / "openvla"))
    if not path.exists():
        pytest.fail(f"{path} does not exist: run `cargo build -p openvla-cli` (or set OPENVLA_BIN)")
    return path


def cli_predict(image: Path, instruction: str, unnorm_key: str, extra: tuple = ()) -> dict:
    """What `openvla predict --json` prints for one observation (`extra`: more flags)."""
    out = subprocess.run(
        [
            str(openvla_bin()),
            "predict",
            "--model",
            str(MODEL),
            "--image",
            str(image),
            "--instruction",
            instruction,
            "--unnorm-key",
            unnorm_key,
            "--json",
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def samples():
    """The fixture's samples: image path, instruction, unnorm_key and the reference's tokens."""
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    return [
        {
            "image": FIXTURE / s["files"]["image"],
            "instruction": s["instruction"],
            "unnorm_key": s["unnorm_key"],
            "reference_tokens": s["generated_ids_list"],
        }
        for s in manifest["samples"]
    ]


@pytest.fixture(scope="session")
def cli_answers(samples):
    """`openvla predict --json` for every sample."""
    return [cli_predict(s["image"], s["instruction"], s["unnorm_key"]) for s in samples]


@pytest.fixture(scope="session")
def policy():
    import openvla_rs

    return openvla_rs.Policy.from_pretrained(MODEL)
