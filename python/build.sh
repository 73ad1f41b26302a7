#!/usr/bin/env bash
# Builds the openvla_rs wheel (one abi3 wheel: CPython >= 3.9, x86-64 Linux) with maturin and
# installs it into the repository's venv, then the openpi websocket client the tests talk to.
#
#   python/build.sh            # dev profile at opt-level 1: the settings of the workspace's test
#                              # profile, so it reuses what `cargo test --workspace` compiled
#                              # (CI: about a minute on top of it); ~0.1 s per tiny-model call
#   python/build.sh --release  # release profile, for measurements and distribution
#
# The venv is $OPENVLA_PYTHON's if set, else <repo>/.venv (tools/setup.sh creates it and
# installs tools/venv/python.txt, which pins maturin). The wheel lands in target/wheels/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${OPENVLA_PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$py" ]; then
  echo "error: $py not found; run tools/setup.sh (or python3 -m venv .venv && .venv/bin/pip install -r tools/venv/python.txt)" >&2
  exit 1
fi
profile=()
case "${1:-}" in
  --release) profile=(--release) ;;
  # The dev profile's own opt-level 0 runs the tiny model ~10x slower (about 1 s per call).
  "") export CARGO_PROFILE_DEV_OPT_LEVEL=1 ;;
  *) echo "usage: python/build.sh [--release]" >&2; exit 2 ;;
esac
out="$root/target/wheels"
rm -f "$out"/openvla_rs-*.whl
# --interpreter names the venv's Python only so maturin checks it; the wheel is abi3.
# maturin reads python/pyproject.toml, which points at crates/openvla-py/Cargo.toml.
(cd "$root/python" && "$py" -m maturin build "${profile[@]}" --interpreter "$py" --out "$out" >&2)
wheel="$(ls "$out"/openvla_rs-*.whl)"
"$py" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
# openpi's websocket client (python/tests/test_openpi.py). Its metadata asks for numpy<2 and
# dm-tree, which websocket_client_policy and msgpack_numpy never import: install it alone.
"$py" -m pip install --quiet --disable-pip-version-check --no-deps openpi-client==0.1.2
echo "installed $(basename "$wheel") into $("$py" -c 'import sys; print(sys.prefix)')"
