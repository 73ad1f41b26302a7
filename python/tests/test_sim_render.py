"""The simulator camera's render settings (`--render fast|default`, python/sim/openvla_sim/sim.py).

`default` must be pixel-identical to Meta-World's own `env.render()` (gymnasium's MuJoCo renderer,
which LeRobot's evaluation uses) on the protocol's camera; `fast` must differ from it (it drops
multisampling, shadows and reflections). Each check runs in a fresh interpreter, because the GL
backend must be chosen before `mujoco` is imported. The project venv (tools/setup.sh) has
metaworld: without it these tests fail, they do not skip.
"""

import json
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, sys
from openvla_sim.gl import ensure_headless_gl
ensure_headless_gl()
import metaworld, numpy as np
from openvla_sim.sim import Camera, MetaWorldTask, MT1_SEED

size = 64
task = MetaWorldTask("reach-v3", "lerobot", size, "fast")
obs = task.reset(0, 1000)
# A fast camera first, on the same model: the default one after it must not inherit its settings.
ours = {r: Camera(task.env.model, size, r).render(task.env.data, "corner4").astype(np.int16)
        for r in ("fast", "default")}
# Meta-World's own renderer, set up as LeRobot does: corner2 moved to corner4's pose.
bench = metaworld.MT1("reach-v3", seed=MT1_SEED)
env = bench.train_classes["reach-v3"](render_mode="rgb_array", camera_name="corner2", width=size, height=size)
env.set_task(bench.train_tasks[0])
env.model.cam_pos[2] = [0.75, 0.075, 0.7]
env._freeze_rand_vec = False
env.seeded_rand_vec = True
env.seed(1000)
obs2, _ = env.reset()
theirs = env.render()[::-1, ::-1].astype(np.int16)
out = {"same_state": bool(np.allclose(obs, obs2))}
for r, img in ours.items():
    out[r] = float(np.abs(img - theirs).mean())
try:
    Camera(task.env.model, size, "pretty")
    out["unknown"] = None
except ValueError as e:
    out["unknown"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def render_check():
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"the render check failed:\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_default_render_is_metaworlds_own(render_check):
    assert render_check["same_state"], "the two envs did not reach the same initial state"
    assert render_check["default"] == 0.0, f"mean |ours - env.render()| = {render_check['default']}"


def test_fast_render_differs_from_it(render_check):
    assert render_check["fast"] > 1.0, f"fast render is too close to the default: {render_check['fast']}"


def test_unknown_render_settings_are_refused(render_check):
    msg = render_check["unknown"]
    assert msg is not None, "Camera accepted render settings 'pretty'"
    assert "pretty" in msg and "fast" in msg and "default" in msg, msg
