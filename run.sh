#!/usr/bin/env bash
# ./run.sh [serve options]   set up .venv, then serve the truss on 127.0.0.1:8080
# ./run.sh test [pytest options]   set up .venv, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if [ "${1:-}" = test ]; then
  shift
  exec .venv/bin/python -m pytest "$@"
fi
[ "${1:-}" = serve ] && shift
exec .venv/bin/python -m truss_llm serve "$@"
