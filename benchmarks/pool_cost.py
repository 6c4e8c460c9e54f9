"""One-thread CPU time of hawqc's average-pool kernel, for comparing two source trees.

    PYTHONPATH=<tree> python benchmarks/pool_cost.py {inception_3x3,ties_6x6,global_8x8} CHAIN

Compiles a QDQ graph of CHAIN average pools (alternating between two scales; 0: the input quantize and
output dequantize alone) with the tree on ``PYTHONPATH``, checks it against the reference, and prints
one JSON line: five figures of thread CPU time per call (``TVM_NUM_THREADS=1``: every kernel runs on the
calling thread, so the figure is little moved by other jobs on the machine). A pool's cost is
``(t(8) - t(0)) / 8``. ``inception_3x3``: Inception-V3's 3x3 branch pool (no sum reaches a tie);
``ties_6x6``: a 6x6 pool of one scale in and out (1/36 of the sums on a tie: the tie-window epilogue).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TVM_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CASES = {  # input shape, kernel, pads, output scale
    "inception_3x3": ((1, 288, 35, 35), [3, 3], [1, 1, 1, 1], 0.0171),
    "ties_6x6": ((1, 256, 35, 35), [6, 6], [2, 2, 3, 3], 0.0123),
    "global_8x8": ((1, 2048, 8, 8), None, None, 0.0071),
}


def pool_chain(case: str, chain: int) -> tuple[object, tuple[int, ...]]:
    shape, kernel, pads, s_out = CASES[case]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s0", 0.0123), ("s1", s_out))]
    inits.append(numpy_helper.from_array(np.array(0, np.uint8), "z"))
    op, attrs = ("GlobalAveragePool", {}) if kernel is None else \
        ("AveragePool", {"kernel_shape": kernel, "pads": pads, "count_include_pad": 1})
    chain = min(chain, 1) if kernel is None else chain
    nodes = [helper.make_node("QuantizeLinear", ["input", "s0", "z"], ["q0"])]
    for k in range(chain):
        scale_in, scale_out = f"s{k % 2}", f"s{(k + 1) % 2}"
        nodes += [helper.make_node("DequantizeLinear", [f"q{k}", scale_in, "z"], [f"f{k}"]),
                  helper.make_node(op, [f"f{k}"], [f"p{k}"], **attrs),
                  helper.make_node("QuantizeLinear", [f"p{k}", scale_out, "z"], [f"q{k + 1}"])]
    nodes.append(helper.make_node("DequantizeLinear", [f"q{chain}", f"s{chain % 2}", "z"], ["output"]))
    graph = helper.make_graph(nodes, "pools", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), shape


def main() -> None:
    import hawqc

    case, chain = sys.argv[1], int(sys.argv[2])
    model, shape = pool_chain(case, chain)
    module = hawqc.compile_integer_only(model, input_shape=shape)
    x = np.abs(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    if not np.array_equal(module(x), module.reference(x)):
        raise SystemExit("the compiled module differs from the reference")
    for _ in range(20):
        module(x)
    calls, figures = 300, []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(calls):
            module(x)
        figures.append((time.thread_time() - start) / calls * 1e6)
    print(json.dumps({"case": case, "chain": chain, "tree": hawqc.__file__, "us_per_call": sorted(figures)}))


if __name__ == "__main__":
    main()
