"""Bad inputs raise Python exceptions with clear messages; the policy stays usable."""

import numpy as np
import pytest
from PIL import Image

import openvla_rs
from conftest import MODEL


@pytest.fixture(scope="module")
def sample(samples):
    s = samples[0]
    return np.asarray(Image.open(s["image"]).convert("RGB")), s["instruction"], s["unnorm_key"]


def test_unknown_unnorm_key_names_the_choices(policy, sample):
    image, instruction, _ = sample
    with pytest.raises(ValueError) as e:
        policy.predict_action(image, instruction, unnorm_key="no_such_dataset")
    msg = str(e.value)
    assert "no_such_dataset" in msg and "fake_bridge_orig" in msg


def test_missing_unnorm_key_with_several_datasets(policy, sample):
    image, instruction, _ = sample
    with pytest.raises(ValueError) as e:
        policy.predict_action(image, instruction)
    assert "unnorm_key" in str(e.value)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((32, 32, 3), dtype=np.float32), ["uint8", "float32"]),
        (np.zeros((32, 32), dtype=np.uint8), ["HxWx3", "(32, 32)"]),
        (np.zeros((32, 32, 4), dtype=np.uint8), ["HxWx3", "(32, 32, 4)"]),
        (np.zeros((0, 32, 3), dtype=np.uint8), ["0"]),
    ],
)
def test_bad_image_arrays(policy, sample, bad, words):
    _, instruction, key = sample
    with pytest.raises(ValueError) as e:
        policy.predict_action(bad, instruction, key)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_image_of_the_wrong_type(policy, sample):
    _, instruction, key = sample
    with pytest.raises(TypeError) as e:
        policy.predict_action([[1, 2, 3]], instruction, key)
    assert "PIL.Image" in str(e.value) and "list" in str(e.value)


def test_instruction_of_the_wrong_type(policy, sample):
    image, _, key = sample
    with pytest.raises(TypeError) as e:
        policy.predict_action(image, 42, key)
    assert "instruction" in str(e.value) and "int" in str(e.value)


def test_empty_instruction(policy, sample):
    image, _, key = sample
    with pytest.raises(ValueError) as e:
        policy.predict_action(image, "", key)
    assert "instruction" in str(e.value)


def test_inputs_the_family_does_not_take(policy, sample):
    image, instruction, key = sample
    with pytest.raises(ValueError) as e:
        policy.predict_action(image, instruction, key, proprio=[0.0] * 8)
    assert "proprio" in str(e.value)
    with pytest.raises(ValueError) as e:
        policy.predict_action(image, instruction, key, images={"wrist_image": image})
    assert "one image" in str(e.value) and "wrist_image" in str(e.value)


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_model_here"
    with pytest.raises(FileNotFoundError) as e:
        openvla_rs.Policy.from_pretrained(missing)
    assert str(missing) in str(e.value)


def test_directory_without_model_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        openvla_rs.Policy.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


def test_bad_precision_and_quantization():
    with pytest.raises(ValueError) as e:
        openvla_rs.Policy.from_pretrained(MODEL, precision="fp8")
    assert "fp8" in str(e.value) and "bf16" in str(e.value)
    with pytest.raises(ValueError) as e:
        openvla_rs.Policy.from_pretrained(MODEL, quantize="int3")
    assert "int3" in str(e.value) and "int4" in str(e.value)
    with pytest.raises(ValueError) as e:
        openvla_rs.Policy.from_pretrained(MODEL, compute="fp8")
    assert "fp8" in str(e.value) and "bf16" in str(e.value)


def test_invalid_model_file_raises_openvla_error(tmp_path):
    for f in MODEL.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(openvla_rs.OpenVLAError) as e:
        openvla_rs.Policy.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)
    assert isinstance(e.value, RuntimeError)


def test_batch_errors_name_the_observation(policy, sample):
    image, instruction, key = sample
    with pytest.raises(ValueError) as e:
        policy.predict_batch([image, image], [instruction, instruction], [key, "nope"])
    assert "observation 1" in str(e.value) and "nope" in str(e.value)
    with pytest.raises(ValueError) as e:
        policy.predict_batch([image, np.zeros((4, 4), np.uint8)], instruction, key)
    assert "observation 1" in str(e.value)
    with pytest.raises(ValueError) as e:
        policy.predict_batch([image, image], [instruction], key)
    assert "instructions" in str(e.value)
    with pytest.raises(TypeError):
        policy.predict_batch(image, instruction, key)


def test_policy_still_works_after_errors(policy, sample):
    image, instruction, key = sample
    with pytest.raises(ValueError):
        policy.predict_action(image, instruction, unnorm_key="nope")
    assert policy.predict_action(image, instruction, key).shape == (7,)
