#!/usr/bin/env bash
# The GPU check on the H200 machine: install the carried wheels (benchmarks/gpu_wheels.sh), then run
# benchmarks/gpu_check.py into the folder given (default: $OUT), to be committed to benchmarks/results/.
#
# apache-tvm's wheel does not fit one call's 64 MiB, so it travels in two calls, the second within the
# machine's 30 s warm window (an ignored folder carried earlier stays on a warm machine):
#     run(carry=[".whl"], command="true")
#     run(carry=[".whl-b"], command="bash benchmarks/gpu_check.sh", timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$OUT}
for first in .whl/*.part-aa; do
    wheel=$(basename "${first%.part-aa}")
    cat "$first" ".whl-b/$wheel.part-ab" > "/tmp/$wheel"
done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/*.whl .whl-b/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py "$out"
