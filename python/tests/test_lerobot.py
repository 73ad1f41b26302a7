"""The LeRobot adapter on stubbed batches (no lerobot or torch install needed)."""


import numpy as np
import pytest
from PIL import Image

from openvla_rs.lerobot import OpenVLAPolicy, to_uint8_hwc


def lerobot_frame(path):
    """A camera frame as LeRobot's preprocessing hands it to a policy: float CHW in [0, 1]."""
    hwc = np.asarray(Image.open(path).convert("RGB"))
    return np.transpose(hwc, (2, 0, 1)).astype(np.float32) / 255.0, hwc


def test_float_chw_frames_recover_the_uint8_image(samples):
    chw, hwc = lerobot_frame(samples[1]["image"])
    np.testing.assert_array_equal(to_uint8_hwc(chw), hwc)
    np.testing.assert_array_equal(to_uint8_hwc(hwc), hwc)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_hwc(chw * 255.0)
    with pytest.raises(ValueError, match="3 color channels"):
        to_uint8_hwc(np.zeros((4, 5, 6), np.float32))


def test_select_action_equals_predict_action(policy, samples):
    same_size = [s for s in samples if Image.open(s["image"]).size == Image.open(samples[0]["image"]).size]
    key = samples[0]["unnorm_key"]
    frames = [lerobot_frame(s["image"]) for s in same_size[:1]] * 2
    batch = {
        "observation.images.image": np.stack([f[0] for f in frames]),
        "observation.state": np.zeros((2, 8), np.float32),
        "task": [same_size[0]["instruction"], "open the drawer"],
    }
    adapter = OpenVLAPolicy(policy, unnorm_key=key)
    assert adapter.n_action_steps == 1
    action = adapter.select_action(batch)
    assert action.shape == (2, 7) and action.dtype == np.float64
    for b in range(2):
        expected = policy.predict_action(frames[b][1], batch["task"][b], key)
        np.testing.assert_array_equal(action[b], expected)


def test_missing_keys_are_named(policy, samples):
    adapter = OpenVLAPolicy(policy, unnorm_key=samples[0]["unnorm_key"])
    chw, _ = lerobot_frame(samples[0]["image"])
    with pytest.raises(KeyError, match="observation.images"):
        adapter.select_action({"task": ["x"]})
    with pytest.raises(KeyError, match="task"):
        adapter.select_action({"observation.images.top": chw[None]})
    with pytest.raises(ValueError, match="instructions"):
        adapter.select_action({"observation.images.top": chw[None], "task": ["a", "b"]})


class ChunkedStub:
    """A stand-in for a chunked policy (K = 4) that counts its calls."""

    chunk_size = 4
    image_keys = ["full_image", "wrist_image"]
    proprio_dim = 3

    def __init__(self):
        self.calls = []

    def predict_action(self, image, instruction, unnorm_key=None, *, images=None, proprio=None):
        self.calls.append((image.shape, instruction, unnorm_key, sorted(images), list(proprio)))
        base = float(len(self.calls)) * 100.0
        return base + np.arange(4 * 2, dtype=np.float64).reshape(4, 2)


def test_chunked_models_queue_n_action_steps():
    stub = ChunkedStub()
    adapter = OpenVLAPolicy(stub, unnorm_key="libero", n_action_steps=3)
    batch = {
        "observation.images.image": np.zeros((1, 3, 8, 8), np.float32),
        "observation.images.wrist_image": np.ones((1, 3, 8, 8), np.float32),
        "observation.state": np.array([[1.0, 2.0, 3.0]], np.float32),
        "task": ["stack the cups"],
    }
    got = [adapter.select_action(batch) for _ in range(4)]
    assert len(stub.calls) == 2, "one prediction per n_action_steps actions"
    np.testing.assert_array_equal(got[0], [[100.0, 101.0]])
    np.testing.assert_array_equal(got[2], [[104.0, 105.0]])
    np.testing.assert_array_equal(got[3], [[200.0, 201.0]])
    shape, instruction, key, extra, proprio = stub.calls[0]
    assert shape == (8, 8, 3) and instruction == "stack the cups" and key == "libero"
    assert extra == ["observation.images.wrist_image"] and proprio == [1.0, 2.0, 3.0]
    adapter.reset()
    adapter.select_action(batch)
    assert len(stub.calls) == 3, "reset() empties the queue"
    with pytest.raises(ValueError, match="n_action_steps"):
        OpenVLAPolicy(stub, n_action_steps=5)
