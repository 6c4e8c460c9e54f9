#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the H200 machine (Python 3.12, x86-64, no network).
#
#     bash benchmarks/gpu_wheels.sh        # from anywhere; writes .whl/ and .whl-b/ at the repo root (git-ignored)
#
# Only what that machine's image lacks (/work/.library/device/KINDS.md lists it: numpy, ml-dtypes,
# typing-extensions, onnx, onnxruntime, protobuf, psutil, cloudpickle, torch, pytest, pytest-xdist... are there):
# apache-tvm and apache-tvm-ffi, pinned as pyproject.toml pins them. apache-tvm's wheel is 96 MiB, over the
# 64 MiB one device call may carry, so it is cut in two: .whl/ holds its first 58 MiB, .whl-b/ the rest and
# apache-tvm-ffi; gpu_check.sh joins them (two calls: see there).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0)
PART=58M
rm -rf .whl .whl-b
mkdir -p .whl .whl-b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl-b "${PACKAGES[@]}"
tvm=$(ls .whl-b/apache_tvm-*.whl)
split -b "$PART" -a 2 "$tvm" ".whl/$(basename "$tvm").part-"
mv ".whl/$(basename "$tvm").part-ab" .whl-b/
rm "$tvm"
du -b .whl/* .whl-b/*
