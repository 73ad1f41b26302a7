"""predict_action / predict / predict_batch equal `openvla predict --json` on the fixture samples."""

import threading

import numpy as np
import pytest
from PIL import Image

from conftest import MODEL, cli_predict


def assert_same_action(got, expected):
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.float64
    assert got.shape == (len(expected),)
    np.testing.assert_allclose(got, np.asarray(expected), rtol=0, atol=1e-12)


def test_predict_action_pil_equals_cli(policy, samples, cli_answers):
    for s, cli in zip(samples, cli_answers):
        action = policy.predict_action(Image.open(s["image"]), s["instruction"], unnorm_key=s["unnorm_key"])
        assert_same_action(action, cli["action"])


def test_predict_tokens_equal_cli_and_reference(policy, samples, cli_answers):
    for s, cli in zip(samples, cli_answers):
        out = policy.predict(Image.open(s["image"]), s["instruction"], s["unnorm_key"])
        assert out["token_ids"] == cli["token_ids"] == s["reference_tokens"]
        assert out["unnorm_key"] == cli["unnorm_key"] == s["unnorm_key"]
        assert_same_action(out["action"], cli["action"])
        assert_same_action(out["normalized_action"], cli["normalized_action"])


def test_predict_action_numpy_equals_cli(policy, samples, cli_answers):
    for s, cli in zip(samples, cli_answers):
        array = np.asarray(Image.open(s["image"]).convert("RGB"))
        assert array.dtype == np.uint8 and array.ndim == 3
        action = policy.predict_action(array, s["instruction"], s["unnorm_key"])
        assert_same_action(action, cli["action"])


def test_numpy_views_are_read_in_logical_order(policy, samples):
    s = samples[1]
    array = np.asarray(Image.open(s["image"]).convert("RGB"))
    flipped_view = array[:, ::-1]  # negative strides, not C-contiguous
    assert not flipped_view.flags["C_CONTIGUOUS"]
    a = policy.predict(flipped_view, s["instruction"], s["unnorm_key"])
    b = policy.predict(np.ascontiguousarray(flipped_view), s["instruction"], s["unnorm_key"])
    assert a["token_ids"] == b["token_ids"]
    np.testing.assert_array_equal(a["action"], b["action"])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_pil_modes_convert_as_the_engine_decodes(policy, samples, tmp_path, mode):
    """A non-RGB PIL image is converted with convert("RGB"), as the engine's PNG decoder does."""
    s = samples[2]
    rgb = Image.open(s["image"]).convert("RGB")
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.linear_gradient("L").resize(rgb.size))
    elif mode == "L":
        image = rgb.convert("L")
    else:
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = tmp_path / f"image_{mode}.png"
    image.save(path)
    cli = cli_predict(path, s["instruction"], s["unnorm_key"])
    out = policy.predict(Image.open(path), s["instruction"], s["unnorm_key"])
    assert out["token_ids"] == cli["token_ids"]
    assert_same_action(out["action"], cli["action"])


def test_predict_batch_equals_cli(policy, samples, cli_answers):
    images = [Image.open(s["image"]) for s in samples]
    # Mixed inputs: PIL for even indices, numpy for odd ones.
    images = [im if i % 2 == 0 else np.asarray(im.convert("RGB")) for i, im in enumerate(images)]
    actions = policy.predict_batch(
        images,
        [s["instruction"] for s in samples],
        unnorm_key=[s["unnorm_key"] for s in samples],
    )
    assert len(actions) == len(samples)
    for got, cli in zip(actions, cli_answers):
        assert_same_action(got, cli["action"])


def test_predict_batch_one_instruction_and_key_for_all(policy, samples):
    s = samples[0]
    image = Image.open(s["image"])
    alone = policy.predict_action(image, s["instruction"], s["unnorm_key"])
    batch = policy.predict_batch([image, image, image], s["instruction"], s["unnorm_key"])
    for got in batch:
        np.testing.assert_array_equal(got, alone)


def test_two_threads_equal_one_thread(policy, samples, cli_answers):
    arrays = [np.asarray(Image.open(s["image"]).convert("RGB")) for s in samples]
    rounds = 2
    results = {}
    errors = []

    def work(name, order):
        try:
            out = []
            for _ in range(rounds):
                for i in order:
                    s = samples[i]
                    out.append((i, policy.predict_action(arrays[i], s["instruction"], s["unnorm_key"])))
            results[name] = out
        except Exception as e:  # reported below: an exception in a thread must fail the test
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=("forward", [0, 1, 2, 3])),
        threading.Thread(target=work, args=("backward", [3, 2, 1, 0])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results["forward"]) == len(results["backward"]) == rounds * len(samples)
    for name in results:
        for i, action in results[name]:
            np.testing.assert_array_equal(action, np.asarray(cli_answers[i]["action"]))


def test_the_gil_is_released_while_the_model_runs(policy, samples):
    """Another Python thread runs while one thread is inside predict_action.

    The ticker stamps the time and sleeps (releasing the GIL) in a loop. With a switch
    interval longer than a prediction, a thread that held the GIL through the model would let
    no stamp fall strictly inside a call; a released GIL lets the ticker in at once.
    """
    import sys
    import time

    s = samples[0]
    array = np.asarray(Image.open(s["image"]).convert("RGB"))
    policy.predict_action(array, s["instruction"], s["unnorm_key"])  # warm up
    stamps = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            stamps.append(time.monotonic())
            time.sleep(0.0002)

    calls = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    t = threading.Thread(target=ticker)
    try:
        t.start()
        for _ in range(5):
            t0 = time.monotonic()
            policy.predict_action(array, s["instruction"], s["unnorm_key"])
            calls.append((t0, time.monotonic()))
    finally:
        done.set()
        t.join()
        sys.setswitchinterval(old)
    inside = [x for x in stamps if any(t0 < x < t1 for t0, t1 in calls)]
    assert inside, f"no ticker stamp inside any of {len(calls)} calls ({len(stamps)} stamps)"


def test_from_pretrained_accepts_pathlike_and_precision(samples, cli_answers):
    import openvla_rs

    p = openvla_rs.Policy.from_pretrained(MODEL, precision="bf16")
    s = samples[0]
    out = p.predict(Image.open(s["image"]), s["instruction"], s["unnorm_key"])
    # bf16 holds the stored bf16 weights: the same function as f32 (docs/precision).
    assert out["token_ids"] == cli_answers[0]["token_ids"]


def test_compute_reaches_the_policy_and_matches_the_cli(samples):
    import openvla_rs

    exact = openvla_rs.Policy.from_pretrained(MODEL)
    assert exact.compute == "f32"
    p = openvla_rs.Policy.from_pretrained(MODEL, compute="bf16")
    assert p.compute == "bf16"
    for s in samples[:2]:
        out = p.predict(Image.open(s["image"]), s["instruction"], s["unnorm_key"])
        cli = cli_predict(s["image"], s["instruction"], s["unnorm_key"], ("--compute", "bf16"))
        # The same engine and arithmetic give the same bits through both front ends.
        assert out["token_ids"] == cli["token_ids"]
        assert_same_action(out["action"], cli["action"])
