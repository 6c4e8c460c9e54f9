"""``hawqc search``: per-layer bits by HAWQ-V3's ILP under size, BOPS or latency budgets."""

from __future__ import annotations

import argparse

HELP = "choose per-layer bits (HAWQ-V3 ILP on Hessian sensitivity) under size/BOPS/latency budgets"


def _bits_option(text: str) -> object:
    from hawqc.bitconfig import LayerBits

    w, _, a = text.lower().lstrip("w").partition("a")
    try:
        return LayerBits(int(w), int(a or w))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bit option {text!r}: {err} (write e.g. w4a4 or 8)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hawqc.commands.sensitivity import add_model_arguments

    add_model_arguments(parser)
    budgets = "fraction in [0, 1] between uniform 4- and 8-bit, or absolute"
    parser.add_argument("--size", help=f"weight-size budget: {budgets} (e.g. 4MB)")
    parser.add_argument("--bops", help=f"BOPS budget: {budgets} (e.g. 30G)")
    parser.add_argument("--latency", help=f"latency budget: {budgets} (e.g. 2.5ms); needs --table")
    parser.add_argument("--table", help="latency table JSON written by hawqc tune")
    parser.add_argument("--any-machine", action="store_true",
                        help="use a --table measured on another machine (by default refused)")
    parser.add_argument("--transition-ms", type=float, default=0.0,
                        help="latency cost of each producer/consumer pair at different bits (default: 0)")
    parser.add_argument("--sensitivity", help="sensitivity JSON from hawqc sensitivity (default: compute it)")
    parser.add_argument("--options", type=_bits_option, nargs="+", help="bit options per layer (default: w4a4 w4a8 w8a8)")
    parser.add_argument("--tie", action="append", default=[], metavar="A,B,...",
                        help="layers that must share bits (repeatable; ResNet downsample ties are automatic)")
    parser.add_argument("--free-first-last", action="store_true", help="do not pin the first and last layer to 8 bits")
    parser.add_argument("--pareto", type=int, default=0, metavar="N", help="sweep N budgets for the report")
    parser.add_argument("--pareto-metric", choices=("size", "bops", "latency"), help="metric the sweep varies")
    parser.add_argument("-o", "--out", default="bit_config.json", help="bit config JSON (default: bit_config.json)")
    parser.add_argument("--report", metavar="DIR", help="write report.md and figures into DIR")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hawqc.commands.quantize import bits_table
    from hawqc.commands.sensitivity import compute, model_and_data
    from hawqc.ilp.report import write_report
    from hawqc.ilp.search import search
    from hawqc.ilp.sensitivity import Sensitivity
    from hawqc.ilp.solver import DEFAULT_OPTIONS, EIGHT_BIT, UNITS

    if args.size is None and args.bops is None and args.latency is None:
        raise ValueError("give at least one budget: --size, --bops or --latency")
    console = Console()
    if args.sensitivity:
        sens = Sensitivity.load(args.sensitivity)
        model, _, shape = model_and_data(args)
    else:
        model, sens, shape = compute(args)
    result = search(model, shape, sens.omega, size=args.size, bops=args.bops, latency=args.latency, table=args.table,
                    options=args.options or DEFAULT_OPTIONS, ties=[t.split(",") for t in args.tie],
                    pin_first_last=None if args.free_first_last else EIGHT_BIT, transition_ms=args.transition_ms,
                    pareto_points=args.pareto, pareto_metric=args.pareto_metric, activation_omega=sens.activation_omega,
                    any_machine=args.any_machine)
    solution = result.solution
    console.print(bits_table(model, solution.bits, f"{args.model}: ILP bits (Σ Ω = {solution.omega:.4g})"))
    for metric, value in solution.metrics.items():
        limit = f" (budget {solution.limits[metric]:.6g})" if metric in solution.limits else ""
        console.print(f"{metric}: {value:.6g} {UNITS[metric]}{limit}")
    solution.bit_config().save(args.out)
    console.print(f"wrote {args.out} (use it with hawqc quantize/compile --bit-config)")
    if args.report:
        console.print(f"wrote {write_report(result, args.report, f'hawqc search: {args.model}')}")
    return 0
