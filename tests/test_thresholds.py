"""The threshold form of an activation of a conv's accumulator equals the file's formula on every accumulator
tried: random int32 values, each threshold and its neighbours, the int32 extremes."""

import numpy as np
import pytest

from hawqc.quant.elementwise import ELEMENTWISE
from hawqc.quant.thresholds import activation_thresholds, count_thresholds, output_codes

SIGMOID = ELEMENTWISE["Sigmoid"]
FUNCTIONS = {"sigmoid": SIGMOID, "silu": lambda v: v * SIGMOID(v), "hardswish": ELEMENTWISE["HardSwish"],
             "hardsigmoid": lambda v: ELEMENTWISE["HardSigmoid"](v, alpha=1 / 6)}


@pytest.mark.parametrize("bounds", [(0, -128, 127), (128, 0, 255), (0, -8, 7)], ids=["int8", "uint8", "int4"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_counted_thresholds_equal_the_formula(name: str, bounds: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(len(name))
    zero_point, qmin, qmax = bounds
    channels = 16
    s_acc = rng.uniform(1e-5, 1e-3, channels) * 0.02
    fraction = rng.uniform(-0.5, 0.5, channels)
    s_out = rng.uniform(0.005, 0.05, channels).astype(np.float32)  # per channel, as NNCF's depthwise inputs
    t = activation_thresholds(FUNCTIONS[name], s_acc, fraction, s_out, zero_point, qmin, qmax)
    near = [t.up.astype(np.int64) + d for d in (-1, 0, 1)] + [t.down.astype(np.int64) + d for d in (-1, 0, 1)]
    acc = np.concatenate([rng.integers(-(2**31), 2**31, (channels, 500)), rng.integers(-(10**6), 10**6, (channels, 500)),
                          np.full((channels, 2), [-(2**31), 2**31 - 1]), *near], axis=1)
    acc = np.clip(acc, -(2**31), 2**31 - 1)
    want = output_codes(acc, FUNCTIONS[name], s_acc, fraction, s_out, zero_point, qmin, qmax)
    assert len(np.unique(want)) > 3
    rows = np.arange(channels)[:, None]
    got = count_thresholds(acc.astype(np.int32), t.base[:, None], (t.up.ravel(), rows * t.up.shape[1], t.up.shape[1]),
                           (t.down.ravel(), rows * t.down.shape[1], t.down.shape[1]))
    np.testing.assert_array_equal(got, want)
    assert (t.down.shape[1] > 0) == (name in ("silu", "hardswish") and qmin < zero_point)


def test_an_activation_that_rises_twice_has_no_threshold_form() -> None:
    with pytest.raises(ValueError, match="does not fall then rise"):
        activation_thresholds(np.sin, np.full(2, 1e-4), None, np.float32(0.01), 0, -128, 127)
