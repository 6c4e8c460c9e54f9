"""The thread pools as hawqc sets them up: one worker per physical core, idle workers asleep soon
after a call (a good neighbour to other work in the process), ``threads=`` honoured; a loaded artifact
runs on hawqc's own pool, bit-exact, also when two threads call modules at once. Each check runs in a
fresh interpreter: the pools are sized once per process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hawqc.runtime.threads import SPIN_COUNT, default_threads

CHILD = """
import ctypes, json, os, resource, sys, tempfile, threading, time
import numpy as np
from hawqc.quant.dyadic import dyadic_per_channel
from hawqc.reference.graph import IntegerGraph, IntOp
from hawqc.runtime import threads
from hawqc.runtime.module import compile_graph, load
from hawqc.runtime.target import parse_target

rng = np.random.default_rng(0)
b, c = dyadic_per_channel(rng.uniform(2e-5, 2e-4, 64))
graph = IntegerGraph("x", "y", [
    IntOp("conv2d", ["x"], "acc", {"stride": [1, 1], "padding": [1] * 4, "dilation": [1, 1], "groups": 1},
          {"weight": rng.integers(-128, 128, (64, 64, 3, 3)).astype(np.int8)}),
    IntOp("requantize", ["acc"], "y", {"qmin": -128, "qmax": 127}, {"b": b, "c": c})])
x = rng.integers(-128, 128, (1, 64, 56, 56)).astype(np.int8)
module = compile_graph(graph, x.shape, parse_target("llvm"), input_dtype="int8", threads=THREADS)
expected = graph.run(x)
pooled = False
if LOADED:
    folder = module.export(tempfile.mkdtemp() + "/m")
    module, twin = load(folder, threads=THREADS), load(folder, threads=THREADS)
    launch = ctypes.c_void_p.in_dll(ctypes.CDLL(str(folder / "model.so")), "__TVMBackendParallelLaunch").value
    pooled = threads._pool is not None and launch == ctypes.cast(threads._pool.hawqc_pool_launch, ctypes.c_void_p).value
    wrong = []
    def hammer(m):
        wrong.extend(i for i in range(30) if not np.array_equal(m(x), expected))
    workers = [threading.Thread(target=hammer, args=(m,)) for m in (module, twin)]
    [w.start() for w in workers]
    [w.join() for w in workers]
    assert not wrong, f"{len(wrong)} concurrent calls differ from the reference"
for _ in range(20):
    assert np.array_equal(module(x), expected)
import tvm
cpu = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
time.sleep(0.05)
before = cpu()
time.sleep(0.5)
print(json.dumps({"idle_cpu_s": cpu() - before, "pool": tvm.runtime.num_threads(), "pooled": pooled,
                  "env": [os.environ.get("TVM_NUM_THREADS"), os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")]}))
"""


def run_child(threads: int | None, env: dict[str, str] | None = None, loaded: bool = False) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "HAWQC_"))}
    child = textwrap.dedent(CHILD).replace("THREADS", repr(threads)).replace("LOADED", repr(loaded))
    result = subprocess.run([sys.executable, "-c", child],
                            capture_output=True, text=True, env={**clean, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("threads")
def test_pool_has_a_worker_per_core_and_sleeps_after_a_call() -> None:
    found = run_child(None)
    assert found["pool"] == default_threads()
    assert found["env"][1] == str(SPIN_COUNT)
    assert found["idle_cpu_s"] < 0.02  # with TVM's default spin count a worker burns ~0.1 s of this 0.5 s


@pytest.mark.xdist_group("threads")
def test_a_loaded_artifact_runs_on_hawqcs_pool_exactly_and_it_sleeps_after_a_call() -> None:
    found = run_child(2, loaded=True)
    assert found["pooled"]
    assert found["idle_cpu_s"] < 0.02


@pytest.mark.xdist_group("threads")
def test_tvms_pool_on_request() -> None:
    assert not run_child(2, {"HAWQC_THREAD_POOL": "tvm"}, loaded=True)["pooled"]


@pytest.mark.xdist_group("threads")
def test_users_settings_win() -> None:
    found = run_child(None, {"TVM_NUM_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "7"})
    assert found["pool"] == 1 and found["env"][1] == "7"


def test_threads_must_be_positive() -> None:
    from hawqc.runtime.threads import configure

    with pytest.raises(ValueError, match="at least 1"):
        configure(0)
