"""The readable properties, the docs and the stub."""

import json
from pathlib import Path

import openvla_rs
from conftest import MODEL


def test_norm_stats_and_keys(policy):
    stats = json.loads((MODEL / "dataset_statistics.json").read_text())
    assert policy.unnorm_keys == sorted(stats)
    for key, s in stats.items():
        assert policy.norm_stats[key]["action"]["q01"] == s["action"]["q01"]
        assert policy.norm_stats[key]["action"]["q99"] == s["action"]["q99"]
        assert policy.action_dim(key) == len(s["action"]["q01"])


def test_config_family_and_inputs(policy):
    assert policy.config == json.loads((MODEL / "config.json").read_text())
    assert policy.family == "openvla"
    assert policy.chunk_size == 1
    assert policy.image_keys == ["image"]
    assert policy.proprio_dim is None
    assert Path(policy.model_dir) == MODEL
    assert "openvla" in repr(policy)


def test_help_documents_every_method():
    doc = openvla_rs.Policy.__doc__
    assert doc and "from_pretrained" in doc
    for name in ["from_pretrained", "predict_action", "predict", "predict_batch", "action_dim"]:
        method_doc = getattr(openvla_rs.Policy, name).__doc__
        assert method_doc and len(method_doc) > 40, name
    for name in ["norm_stats", "unnorm_keys", "config", "family", "chunk_size"]:
        assert getattr(openvla_rs.Policy, name).__doc__, name
    assert "predict_action" in openvla_rs.__doc__


def test_stub_and_marker_ship_with_the_package():
    pkg = Path(openvla_rs.__file__).parent
    assert (pkg / "py.typed").exists()
    stub = (pkg / "_native.pyi").read_text()
    for name in ["def from_pretrained", "def predict_action", "def predict_batch", "def norm_stats"]:
        assert name in stub
