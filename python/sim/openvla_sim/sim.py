"""One Meta-World env with LeRobot's evaluation protocol and the fast corner4 camera.

Protocol `lerobot` (LeRobot's `lerobot-eval --env.type=metaworld`, after PR #3727):
    MT1(task, seed=42); env.set_task(train_tasks[0]); env._freeze_rand_vec = False;
    env.seeded_rand_vec = True; per episode: env.seed(seed), then env.reset().
Protocol `metaworld` (the benchmark's own): MT1(task, seed=42); episode i runs the fixed goal
    train_tasks[i % 50] (set_task freezes its random vector); env.seed(seed) too, for the
    remaining randomness.
Both: horizon 500 (max_path_length), actions clipped to [-1, 1], success if info["success"]
fires at any step.
"""

import numpy as np

MT1_SEED = 42
HORIZON = 500
#: Seeds of demonstration episodes start here; evaluation seeds must stay below (see demos).
DEMO_SEED_BASE = 1_000_000_000


#: Render settings (`--render`): "fast" turns MSAA off (offsamples=0) and shadows and
#: reflections off (~10-30 ms a frame on llvmpipe); "default" keeps MuJoCo's (4x MSAA, shadows,
#: reflections; ~100-180 ms), pixel-identical to Meta-World's own env.render() that LeRobot uses.
RENDERS = ("fast", "default")


class Camera:
    """An offscreen renderer with the `render` settings (see RENDERS). `corner*` cameras are
    rotated 180 degrees (img[::-1, ::-1])."""

    def __init__(self, model, size: int, render: str = "fast"):
        import mujoco

        if render not in RENDERS:
            raise ValueError(f"unknown render settings {render!r}; expected one of {', '.join(RENDERS)}")
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        # The renderer reads offsamples when it is created; the model keeps its own value, so
        # another Camera on the same model starts from MuJoCo's settings.
        offsamples = model.vis.quality.offsamples
        if render == "fast":
            model.vis.quality.offsamples = 0
        try:
            self.renderer = mujoco.Renderer(model, size, size)
        finally:
            model.vis.quality.offsamples = offsamples
        if render == "fast":
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.size = size

    def render(self, data, camera: str) -> np.ndarray:
        self.renderer.update_scene(data, camera=camera)
        img = self.renderer.render()
        if camera.startswith("corner"):
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img)

    def close(self):
        self.renderer.close()


class MetaWorldTask:
    """A Meta-World env for one task, set up for `protocol` ("lerobot" or "metaworld")."""

    def __init__(self, task: str, protocol: str = "lerobot", image_size: int = 224, render: str = "fast"):
        import metaworld

        if protocol not in ("lerobot", "metaworld"):
            raise ValueError(f"unknown protocol {protocol!r}; expected lerobot or metaworld")
        self.task = task
        self.protocol = protocol
        self.benchmark = metaworld.MT1(task, seed=MT1_SEED)
        self.env = self.benchmark.train_classes[task]()
        self.env.set_task(self.benchmark.train_tasks[0])
        self.env._freeze_rand_vec = False
        self.env.seeded_rand_vec = True
        self.horizon = min(HORIZON, int(self.env.max_path_length))
        self.image_size = image_size
        self.camera = Camera(self.env.model, image_size, render)

    def reset(self, index: int, seed: int):
        """Resets for episode `index` with `seed`; returns the 39-D observation."""
        if self.protocol == "metaworld":
            self.env.set_task(self.benchmark.train_tasks[index % len(self.benchmark.train_tasks)])
        else:
            self.env._freeze_rand_vec = False
            self.env.seeded_rand_vec = True
        self.env.seed(int(seed))
        obs, _ = self.env.reset()
        return obs

    def rand_vec(self) -> np.ndarray:
        """The object/goal random vector of the current episode."""
        return np.asarray(self.env._last_rand_vec, dtype=np.float64)

    def environment_state(self, obs) -> np.ndarray:
        """The privileged scene state of `obs` (6-D, float32): the first object's position
        obs[4:7] and the goal's position (`_target_pos`; the observation's own goal slots
        obs[36:39] are zeros under the benchmark's partial observability). Recorded with
        demonstrations as `observation.environment_state` for auxiliary training targets; a
        policy never receives it."""
        goal = np.asarray(self.env._target_pos, dtype=np.float64).reshape(-1)[:3]
        return np.concatenate([np.asarray(obs[4:7], dtype=np.float64), goal]).astype(np.float32)

    def step(self, action):
        """Steps with the action clipped to [-1, 1]; returns (obs, success, truncated)."""
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        obs, _, _, truncated, info = self.env.step(a)
        return obs, bool(info.get("success", 0.0) > 0.5), bool(truncated)

    def render(self, camera: str = "corner4") -> np.ndarray:
        return self.camera.render(self.env.data, camera)

    def close(self):
        self.camera.close()
        self.env.close()


def benchmark_goals(task: str) -> np.ndarray:
    """The benchmark's 50 fixed random vectors of `task` (MT1(task, seed=42).train_tasks)."""
    import pickle

    import metaworld

    bench = metaworld.MT1(task, seed=MT1_SEED)
    return np.stack([np.asarray(pickle.loads(t.data)["rand_vec"], dtype=np.float64) for t in bench.train_tasks])
