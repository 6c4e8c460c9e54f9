"""Where and how a compiled layer is timed: this machine or an RPC tracker's servers.

Every measurement exports the module, uploads it to a session (a local one, or a server the
tracker hands out), checks it bit-exact against the numpy reference on random inputs, then times
it with TVM's time evaluator (median over ``repeat`` runs of at least ``min_repeat_ms`` each),
noting the 1-minute load average and the max/min spread of the repeats: the runner measures again
when either says the machine was busy (:meth:`Timing.noisy`).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hawqc import interrupts


class MismatchError(Exception):
    """A compiled candidate disagrees with the reference: it must not enter the table."""


class DeviceError(Exception):
    """The measuring device failed (RPC server gone, session lost) even after retries."""


@dataclass(frozen=True)
class Measurement:
    latency_ms: float
    """Median over the repeats."""
    stdev_ms: float
    n_runs: int
    """Number of repeats (each one averages enough runs to last ``min_repeat_ms``)."""
    spread: float = 1.0
    """Slowest repeat / fastest repeat."""
    load_1min: float | None = None
    """The 1-minute load average of the measuring machine after the timing (``None``: unknown, RPC)."""


@dataclass
class Timing:
    """How long to time: ``repeat`` medians of runs lasting at least ``min_repeat_ms``; a measurement
    whose spread exceeds ``max_spread`` or taken at a load above ``max_load`` (default: the number of
    CPUs, every core busy) is repeated, up to ``attempts`` times in all."""

    repeat: int = 5
    min_repeat_ms: int = 50
    max_spread: float = 1.2
    max_load: float | None = None
    attempts: int = 3

    def noisy(self, measurement: Measurement) -> bool:
        max_load = self.max_load if self.max_load is not None else float(os.cpu_count() or 1)
        loaded = measurement.load_1min is not None and measurement.load_1min > max_load
        return loaded or measurement.spread > self.max_spread


class Device:
    """The machine that runs the candidates: ``local`` (this process) or an RPC tracker key."""

    def __init__(self, tracker: str | None = None, key: str | None = None, attempts: int = 3,
                 session_timeout_s: int = 600) -> None:
        if (tracker is None) != (key is None):
            raise ValueError("--rpc-tracker and --rpc-key go together")
        self.tracker, self.key, self.attempts, self.session_timeout_s = tracker, key, attempts, session_timeout_s
        self.host, self.port = _host_port(tracker) if tracker else (None, None)
        self.failures: list[str] = []
        """One line per failed attempt (retried or not), for the report."""

    @property
    def name(self) -> str:
        if self.key is None:
            return _cpu_name()
        return f"rpc:{self.key}@{self.tracker}"

    def machine(self, target: str) -> dict[str, Any]:
        """The fingerprint a latency table records: device name, core count (local only), target."""
        return {"device": self.name, "cores": os.cpu_count() if self.key is None else None, "target": target}

    def session(self) -> Any:
        from tvm import rpc

        if self.key is None:
            logging.getLogger("RPCServer").setLevel(logging.WARNING)  # it logs every module it loads
            return rpc.LocalSession()
        return rpc.connect_tracker(self.host, self.port).request(self.key, session_timeout=self.session_timeout_s)

    def run(self, what: str, task: Callable[[Any], Any], log: Callable[[str], None] = print) -> Any:
        """``task(session)`` with a fresh session, retried on device errors; a mismatch is not retried."""
        for attempt in range(1, self.attempts + 1):
            try:
                return task(self.session())
            except MismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - RPC failures surface as TVMError, OSError, RuntimeError...
                interrupts.check()  # a Ctrl-C that TVM turned into an error is not a device failure
                line = f"{what}: attempt {attempt}/{self.attempts} on {self.name} failed ({error_line(err)})"
                self.failures.append(line)
                log(line + ("; retrying" if attempt < self.attempts else ""))
                time.sleep(min(2.0 * attempt, 5.0))
        raise DeviceError(f"{what}: failed {self.attempts} times on {self.name}")


def measure(module: Any, inputs: list[np.ndarray], expected: list[np.ndarray], session: Any,
            timing: Timing) -> Measurement:
    """Check that ``module`` (a :class:`~hawqc.runtime.module.CompiledModule`) maps ``inputs`` to the
    reference outputs ``expected`` on the session's CPU, then time it there."""
    import tvm
    from tvm import relax, rpc

    from hawqc.runtime.module import LIBRARY, native_stderr_silenced

    with tempfile.TemporaryDirectory(prefix="hawqc-tune-") as tmp:
        artifact = module.export(Path(tmp) / "layer")
        session.upload(str(artifact / LIBRARY), "layer.so")
    device = session.cpu()
    with native_stderr_silenced():  # TVM warns "Scope Loaded" per function
        vm = relax.VirtualMachine(session.load_module("layer.so"), device)
    for x, want in zip(inputs, expected):
        got = vm["main"](tvm.runtime.tensor(x, device)).numpy()
        if got.shape != want.shape or not np.array_equal(got.astype(np.int64), want.astype(np.int64)):
            wrong = int(np.sum(got.astype(np.int64) != want.astype(np.int64))) if got.shape == want.shape else -1
            raise MismatchError(f"{wrong} of {want.size} outputs differ from the reference")
    timer = vm.time_evaluator("main", device, repeat=1, min_repeat_ms=timing.min_repeat_ms)
    x = tvm.runtime.tensor(inputs[0], device)
    # one repeat per call: Python runs between repeats, so Ctrl-C needs at most one repeat to land
    seconds = np.asarray([timer(x).results[0] for _ in range(timing.repeat)]) * 1e3
    load = round(os.getloadavg()[0], 2) if isinstance(session, rpc.LocalSession) else None
    return Measurement(float(np.median(seconds)), float(np.std(seconds)), len(seconds),
                       float(seconds.max() / max(seconds.min(), 1e-12)), load)


def this_machine(target: str = "") -> dict[str, Any]:
    """The fingerprint of the machine running this process (see :meth:`Device.machine`)."""
    return Device().machine(target)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--rpc-tracker must look like HOST:PORT, got {text!r}")
    return host, int(port)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def error_line(err: BaseException) -> str:
    """``Type: last line of the message``: TVM errors end with the useful line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:200]
