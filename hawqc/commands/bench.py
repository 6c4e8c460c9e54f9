"""``hawqc bench``: latency and throughput of an artifact at batch sizes, beside ONNX Runtime / OpenVINO."""

from __future__ import annotations

import argparse
from typing import Any

from hawqc.commands._common import Problems, add_target_arguments, is_artifact, positive_list, target_of

HELP = "time a compiled artifact (or a model) at batch sizes, beside ONNX Runtime and OpenVINO on an ONNX file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT",
                        help="folder written by hawqc compile (recompiled for other batch sizes), or a quantized "
                             "model (.onnx, .int.npz) compiled with --target/--kernels")
    parser.add_argument("--batch", type=positive_list, default=[1],
                        help="batch sizes, e.g. 1,8 (default 1)")
    parser.add_argument("--onnx", metavar="FILE", help="also time this ONNX file in ONNX Runtime and OpenVINO "
                        "(those installed), each in its own process")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per figure, after a 1 s warm-up (default 20)")
    parser.add_argument("-o", "--out", help="also write the figures as JSON here")
    add_target_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from hawqc.fileio import write_atomic

    problems = Problems()  # every input mistake in one message, before any work
    sample = problems.check(sample_shape, args)
    target = None if sample is None or Path(args.artifact).is_dir() else problems.check(target_of, args)
    if args.onnx is not None and not args.onnx.endswith(".onnx"):
        problems.add(f"--onnx {args.onnx}: expected an .onnx file")
    elif args.onnx is not None and not Path(args.onnx).is_file():
        problems.add(f"--onnx {args.onnx}: no such file")
    if args.runs < 1:
        problems.add(f"--runs must be at least 1, got {args.runs}")
    problems.raise_any()
    engines = [("hawqc", args.artifact)] + [(peer, args.onnx) for peer in installed_peers() if args.onnx]
    console = Console()
    if args.onnx and len(engines) == 1:
        console.print("[yellow]neither onnxruntime nor openvino is installed: timing hawqc alone[/]")
    figures = []
    with console.status("timing") as status:
        for batch in args.batch:
            for engine, path in engines:  # engines alternate, each figure in a fresh process
                status.update(f"timing {engine} at batch {batch}")
                options = {"threads": args.threads}
                if engine == "hawqc" and target is not None:
                    options.update(target=json.dumps(target), kernels=args.kernels)
                figure = time_in_process(engine, path, (batch, *sample), args.runs, options)
                figures.append({"engine": engine, "batch": batch, **figure})
    table = Table(title=f"{args.artifact}: {args.runs} timed calls per figure after a 1 s warm-up, one process each")
    for column in ("engine", "batch", "ms", "min", "max", "inputs/s", "load", "others"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for f in figures:
        if "error" in f:
            table.add_row(f["engine"], str(f["batch"]), f"[red]{f['error']}[/]", "", "", "", "", "")
            continue
        table.add_row(f["engine"], str(f["batch"]), f"{f['median_ms']:.3f}", f"{f['min_ms']:.3f}", f"{f['max_ms']:.3f}",
                      f"{1e3 * f['batch'] / f['median_ms']:.1f}", f"{max(f['load_before'], f['load_after']):.2f}",
                      f"{f['other_cores']:.2f}")
    console.print(table)
    console.print("ms: median per call; load: the 1-minute load average around the timing (others: the CPU "
                  "cores the rest of the machine used meanwhile); a busy machine slows the peers more than hawqc")
    if args.out:
        record = {"artifact": args.artifact, "onnx": args.onnx, "runs": args.runs,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "figures": figures}
        write_atomic(args.out, json.dumps(record, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 1 if any("error" in f for f in figures) else 0


def sample_shape(args: argparse.Namespace) -> tuple[int, ...]:
    """The input shape of one sample (no batch dim) of ARTIFACT."""
    import json
    from pathlib import Path

    from hawqc import api

    if is_artifact(args):
        manifest = Path(args.artifact) / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"{args.artifact}: not an artifact folder (no manifest.json)")
        return tuple(json.loads(manifest.read_text())["input_shape"][1:])
    recorded = api.integer_graph_of(args.artifact).metadata.get("input_shape") or []
    if len(recorded) < 2 or any(d is None for d in recorded[1:]):
        raise ValueError(f"{args.artifact}: its input shape is not recorded: compile it first (hawqc compile)")
    return tuple(recorded[1:])


def installed_peers() -> list[str]:
    import importlib.util

    return [peer for peer in ("onnxruntime", "openvino") if importlib.util.find_spec(peer) is not None]


def time_in_process(engine: str, path: str, shape: tuple[int, ...], runs: int,
                    options: dict[str, Any]) -> dict[str, Any]:
    """One figure from ``python -m hawqc.runtime.timing`` in a fresh interpreter, with the worker
    ``options`` (threads, target, kernels) that are set; ``{"error": ...}`` on failure."""
    import sys

    from hawqc.runtime.timing import run_worker

    command = [sys.executable, "-m", "hawqc.runtime.timing", engine, path, ",".join(map(str, shape)),
               "--runs", str(runs)]
    for name, value in options.items():
        if value is not None:
            command += [f"--{name}", str(value)]
    return run_worker(command)
