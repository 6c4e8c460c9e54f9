"""Targets: the familiar string form (``llvm -mcpu=znver4``, ``cuda -arch=sm_75``) or TVM 0.27's
JSON dicts, normalised to a dict; plain ``llvm`` means the host CPU."""

from __future__ import annotations

import json
import shlex
from typing import Any

KERNELS = ("auto", "amx", "vnni", "vnni-w4", "avx2", "generic")
"""CPU kernel choices: ``auto`` picks ``amx`` where the target has AMX int8 (convs of 64 input channels or more on
AMX tiles, the rest on VNNI), else ``vnni`` where it has AVX-512 VNNI, else ``avx2``;
``vnni-w4`` keeps 4-bit weights packed two per byte (half the weight memory, but slower on Zen 4 at
every ResNet-50 layer measured, batch-1 late layers included: ``benchmarks/int4_packing.py``); ``generic`` is TVM's own lowering without hawqc schedules (a baseline)."""


def parse_target(spec: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """A TVM target dict from a string, JSON text or dict; ``ValueError`` for anything TVM refuses."""
    if spec is None or spec == "":
        spec = "llvm"
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"target {spec!r} is not valid JSON ({err})") from None
    config = dict(spec) if isinstance(spec, dict) else _from_string(spec)
    if config.get("kind") == "llvm" and "mcpu" not in config:
        config["mcpu"] = host_cpu()
        config["mattr"] = [*config.get("mattr", []), *host_only_features()]
        if not config["mattr"]:
            del config["mattr"]
    import tvm

    try:
        tvm.target.Target(config)
    except Exception as err:  # tvm raises ValueError/TVMError with multi-line texts
        raise ValueError(f"unknown target {spec!r}: {str(err).splitlines()[0]}") from None
    return config


def _from_string(text: str) -> dict[str, Any]:
    words = shlex.split(text)
    if not words or words[0].startswith("-"):
        raise ValueError(f"unknown target {text!r}: it must start with a kind such as llvm or cuda")
    config: dict[str, Any] = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or not sep:
            raise ValueError(f"unknown target {text!r}: options look like -key=value, got {word!r}")
        config[key] = value.split(",") if key in ("mattr", "libs", "keys") else value
    return config


AMX_FEATURES = {"amx_tile": "+amx-tile", "amx_int8": "+amx-int8"}
"""Linux's names of the AMX int8 flags and LLVM's."""


def host_only_features() -> list[str]:
    """LLVM features the host has that its CPU name does not imply: AMX int8 on a virtual machine that reports
    an older model (an Intel Xeon VM here reads as ``rocketlake``), from Linux's CPU flags."""
    import tvm

    cpu, flags = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()}), linux_cpu_flags()
    return [llvm for linux, llvm in AMX_FEATURES.items()
            if linux in flags and not tvm.target.codegen.target_has_features(llvm[1:], cpu)]


def linux_cpu_flags() -> set[str]:
    """The first CPU's flags in ``/proc/cpuinfo`` (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def host_cpu() -> str:
    """The host CPU name LLVM knows (e.g. znver4)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())
