"""Headless OpenGL for MuJoCo: MUJOCO_GL must be set before `mujoco` is imported.

`ensure_headless_gl()` sets MUJOCO_GL=egl unless the caller chose a backend, probes a tiny
offscreen render, and if EGL cannot render re-executes the process with MUJOCO_GL=osmesa
(both run on Mesa llvmpipe on a CPU-only machine).
"""

import os
import sys

_PROBE_XML = "<mujoco><worldbody><light pos='0 0 1'/><geom type='sphere' size='0.1'/></worldbody></mujoco>"


def _set_backend(name: str) -> None:
    os.environ["MUJOCO_GL"] = name
    if name in ("egl", "osmesa"):
        os.environ["PYOPENGL_PLATFORM"] = name


def ensure_headless_gl() -> str:
    """Selects and checks the GL backend; returns its name. Re-executes the process on fallback."""
    if "mujoco" in sys.modules:
        return os.environ.get("MUJOCO_GL", "")
    backend = os.environ.get("MUJOCO_GL") or "egl"
    _set_backend(backend)
    try:
        import mujoco

        model = mujoco.MjModel.from_xml_string(_PROBE_XML)
        renderer = mujoco.Renderer(model, 8, 8)
        renderer.update_scene(mujoco.MjData(model))
        renderer.render()
        renderer.close()
        return backend
    except Exception as e:  # any GL failure: try the software fallback once
        if backend == "egl" and not os.environ.get("OPENVLA_SIM_GL_FALLBACK"):
            print(f"openvla_sim: EGL rendering failed ({e}); retrying with MUJOCO_GL=osmesa", file=sys.stderr)
            env = dict(os.environ, MUJOCO_GL="osmesa", PYOPENGL_PLATFORM="osmesa", OPENVLA_SIM_GL_FALLBACK="1")
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
        raise RuntimeError(
            f"MuJoCo cannot render headless with MUJOCO_GL={backend} ({e}); install libegl1 libgl1 libosmesa6 "
            "(tools/setup.sh does)"
        ) from e
