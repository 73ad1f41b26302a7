#!/usr/bin/env bash
# Installs what the build and the tests need beyond the Rust toolchain, from the package
# registries only. Safe to run repeatedly.
#
# - Debian packages: gcc, ffmpeg, python3 with venv, and the GL libraries MuJoCo renders
#   headless with (libegl1 libgl1 libosmesa6, and the Mesa drivers libegl-mesa0 libgl1-mesa-dri:
#   MUJOCO_GL=egl, or osmesa as the fallback, on Mesa llvmpipe).
# - The project virtual environment `.venv` at the repository root: every pinned requirements
#   file in tools/venv/*.txt, and the simulator package python/sim (openvla_sim, linked into the
#   venv with a .pth file, so it runs from the checkout). Tests find the interpreter as
#   $OPENVLA_PYTHON if set, else <repo>/.venv/bin/python. Nothing goes into the system Python.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ "$(id -u)" = 0 ]; then sudo_=(); else sudo_=(sudo); fi
need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
for lib in libegl1 libgl1 libosmesa6 libegl-mesa0 libgl1-mesa-dri; do
  dpkg -s "$lib" >/dev/null 2>&1 || need_apt+=("$lib")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  "${sudo_[@]}" apt-get update -qq
  "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
reqs=()
for f in "$root"/tools/venv/*.txt; do reqs+=(-r "$f"); done
# A stamp of the requirements files skips pip entirely when nothing changed.
stamp="$venv/.openvla-requirements.sha256"
want="$(cat "$root"/tools/venv/*.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${reqs[@]}"
  echo "$want" > "$stamp"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root/python/sim" > "$site/openvla_sim.pth"
"$venv/bin/python" -c 'import openvla_sim, metaworld, pyarrow, requests, json_numpy, PIL' \
  || { echo "setup: the .venv is incomplete (see the error above)" >&2; exit 1; }
