"""``hawqc tune``: per-layer latency at each bit width, tuned with MetaSchedule, into a latency table."""

from __future__ import annotations

import argparse
from typing import Any

from hawqc.commands._common import Problems, add_target_arguments, input_shape, kernels_of, target_of

SUPPORTED_BITS = (4, 8)
"""Bit widths the compiler builds kernels for (weights = activations in a table row)."""
HELP = "measure and tune every conv/dense layer at each bit width: the latency table the ILP reads"


def bit_list(text: str) -> list[int]:
    """``4,8`` -> [4, 8], for argparse."""
    try:
        bits = sorted({int(b) for b in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must look like 4,8, got {text!r}") from None
    if not bits or set(bits) - set(SUPPORTED_BITS):
        raise argparse.ArgumentTypeError(f"bit widths must be among {','.join(map(str, SUPPORTED_BITS))} (what the "
                                         f"compiler builds), got {text!r}")
    return bits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", metavar="MODEL",
                        help="built-in model (resnet18, resnet50, inceptionv3, ...) or model file (.onnx, .int.npz)")
    parser.add_argument("--input-shape", type=input_shape, help="input shape (default: the model's, batch 1)")
    add_target_arguments(parser)
    parser.add_argument("--bits", type=bit_list, default=[4, 8], help="bit widths, weights = activations (default 4,8)")
    parser.add_argument("--trials", type=_count, default=8,
                        help="MetaSchedule trials per workload; 0 measures the default schedule only (default 8)")
    parser.add_argument("-o", "--out", default="latency-table.json",
                        help="latency table (JSON; a CSV is written beside it; default latency-table.json)")
    parser.add_argument("--limit", type=_positive, help="measure only the first N workloads")
    parser.add_argument("--predict-missing", action="store_true",
                        help="predict the layers not measured with an XGBoost regressor (rows marked predicted)")
    parser.add_argument("--report", nargs="?", const="rich", choices=("rich", "markdown"),
                        help="print INT4/INT8 ratios per layer (after tuning, or of -o alone without --layers)")
    parser.add_argument("--repeat", type=_positive, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--min-repeat-ms", type=_count, default=50, help="minimum length of one repeat (default 50)")
    parser.add_argument("--max-spread", type=float, default=1.2,
                        help="measure again (up to 3 times) when the slowest repeat exceeds the fastest by this "
                             "factor (default 1.2); rows still noisy are marked and measured again by the next run")
    parser.add_argument("--max-load", type=float,
                        help="measure again when the 1-minute load average exceeds this (default: the CPU count)")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT",
                        help="measure on the RPC servers of this tracker (give their --target)")
    parser.add_argument("--rpc-key", metavar="KEY", help="device key of the RPC servers to use")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from hawqc.autotune.table import LatencyTable

    console = Console()
    if args.layers is None:
        if not args.report:
            raise ValueError("give --layers MODEL to tune, or --report to print an existing table")
        if not Path(args.out).exists():
            raise ValueError(f"{args.out}: no such latency table")
        _print_report(LatencyTable.open(args.out), args.report, console)
        return 0
    return _tune(args, console)


def _tune(args: argparse.Namespace, console: Any) -> int:
    import time
    from pathlib import Path

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from hawqc.autotune import runner, workloads
    from hawqc.autotune.measure import Device, Timing
    from hawqc.autotune.table import LatencyTable

    problems = Problems()  # every input mistake in one message, before any work
    device = problems.check(Device, args.rpc_tracker, args.rpc_key)
    target = problems.check(target_of, args)
    table = problems.check(LatencyTable.open, args.out)
    groups = problems.check(workloads.extract, args.layers, args.input_shape)
    if None not in (device, target, table, groups):  # the table takes this machine's rows at this shape only
        problems.check(table.check_same_place, device.machine(runner.target_text(target)),
                       list(groups[0].workload.input_shape))
    problems.raise_any()
    timing = Timing(args.repeat, args.min_repeat_ms, args.max_spread, args.max_load)
    options = runner.RunOptions(target, args.bits, args.trials, timing, device, args.limit, kernels=kernels_of(args),
                                threads=args.threads)
    layers = sum(len(g.layers) for g in groups)
    console.print(f"{args.layers}: {layers} layers, {len(groups)} distinct workloads x bits {args.bits}; "
                  f"{args.trials} trials each on {device.name}; table {args.out}")
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("tuning", total=None)

        def progress(what: str, finished: int, total: int) -> None:
            bar.update(task, description=what, completed=finished, total=total)

        result = runner.run(groups, table, options, progress, bar.console.print)
    console.print(f"{result.done} entries measured in {time.perf_counter() - start:.0f} s, {result.skipped} already "
                  f"in the table; {len(result.rejected)} candidates rejected (not bit-exact), "
                  f"{len(device.failures)} device failures retried")
    if result.noisy:
        console.print(f"[yellow]{result.noisy} entries stayed noisy (spread above {args.max_spread} or load above "
                      f"{timing.max_load or 'the CPU count'}): marked in the table, measured again by the next run[/]")
    if args.predict_missing:
        from hawqc.autotune.predict import predict_missing

        prediction = predict_missing(table, groups, args.bits)
        error = "n/a" if prediction.heldout_error is None else f"{100 * prediction.heldout_error:.1f}%"
        console.print(f"predicted {prediction.rows} rows (held-out median error {error}, leave one workload out)")
    if args.report:
        _print_report(table, args.report, console)
    for line in result.failed:
        console.print(f"[red]not measured:[/] {line}")
    console.print(f"wrote {args.out} and {Path(args.out).with_suffix('.csv')}; log in "
                  f"{runner.tuning_folder(Path(args.out)) / 'tune.log'}")
    return 1 if result.failed else 0


def _print_report(table: Any, style: str, console: Any) -> None:
    from hawqc.autotune import report

    if style == "markdown":
        print(report.markdown(table), end="")
    else:
        report.print_rich(table, console)
