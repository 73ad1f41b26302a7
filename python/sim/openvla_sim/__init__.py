"""openvla_sim: the simulator side of `openvla eval metaworld` and `openvla sim demos metaworld`.

Modules:
- `tasks`: Meta-World v3 task names, LeRobot's task descriptions and difficulty groups (tasks.json,
  shared with the Rust harness).
- `gl`: headless OpenGL selection (MUJOCO_GL=egl, falling back to osmesa), done before MuJoCo loads.
- `sim`: one Meta-World env with LeRobot's protocol (or the official 50-goal one) and the fast
  corner4 camera.
- `client`: the policy client: `/act` json-numpy over one persistent HTTP/1.1 connection with
  TCP_NODELAY.
- `worker`: the worker process the Rust harness drives over stdin/stdout (JSON lines).
- `policy_server`: the scripted experts (`metaworld.policies`) and a random policy behind the same
  `/act` and `/metadata` routes as `openvla serve`.
- `media`: MP4 (ffmpeg), contact sheets and the bar chart.
- `lerobot_v3`: the LeRobot v3 dataset writer of `openvla sim demos`.
- `check_lerobot`: a manual check that `lerobot`'s own LeRobotDataset loads a demo dataset.
"""

__version__ = "0.1.0"
