#!/usr/bin/env bash
# Install segadapt with its test extras (torch pinned to the CPU build) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e ".[test]"
python -m pytest -q "$@"
