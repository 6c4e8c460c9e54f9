"""Dyadic requantization against exact rational arithmetic."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hawqc.quant.dyadic import (
    _tie_in_range,
    aligned_multipliers,
    bias_in_accumulator,
    dyadic,
    dyadic_per_channel,
    exact_requantization,
    fraction_offset,
    high_word_form,
    high_word_shift,
    high_word_sum_form,
    int32_sum_form,
    pool_multipliers,
    requantize,
    round_shift,
    rounding_bias,
    scale_ratio,
    self_check,
    tie_window,
)

INT32 = st.integers(-(2**31), 2**31 - 1)
# Ratios over all representable decades [2^-32, 2^30), log-uniform, plus raw floats in that range.
RATIOS = st.one_of(
    st.floats(-32, 29.999).map(lambda e: float(np.exp2(e))),
    st.floats(2.0**-32, 2.0**30 - 1),
)


def round_half_even(x: Fraction) -> int:
    """Python's ``round`` of a Fraction: to the nearest integer, ties to the even one."""
    return round(x)


@settings(max_examples=10_000, deadline=None)
@given(ratio=RATIOS, acc=INT32)
def test_requantize_equals_exact_rounding(ratio: float, acc: int) -> None:
    b, c = dyadic(ratio)
    assert 2**30 <= b < 2**31 and 1 <= c <= 62
    assert abs(Fraction(b, 2**c) - Fraction(ratio)) <= Fraction(ratio) / 2**31
    got = requantize(np.array([acc], dtype=np.int32), b, c, -(2**31), 2**31 - 1)
    assert int(got[0]) == max(-(2**31), min(2**31 - 1, round_half_even(Fraction(acc * b, 2**c))))


@settings(max_examples=300, deadline=None)
@given(ratios=st.lists(RATIOS, min_size=1, max_size=8), data=st.data())
def test_numpy_and_torch_are_bit_identical_per_channel(ratios: list[float], data: st.DataObject) -> None:
    b, c = dyadic_per_channel(ratios)
    rows = data.draw(st.integers(1, 6))
    acc = np.array(data.draw(st.lists(INT32, min_size=rows * len(ratios), max_size=rows * len(ratios))),
                   dtype=np.int32).reshape(rows, len(ratios))
    qmin, qmax = data.draw(st.sampled_from([(-128, 127), (0, 15), (-8, 7), (0, 255)]))
    expected = np.array([[min(max(round_half_even(Fraction(int(a) * int(bb), 2 ** int(cc))), qmin), qmax)
                          for a, bb, cc in zip(row, b, c)] for row in acc])
    got_np = requantize(acc, b, c, qmin, qmax, axis=1)
    got_torch = requantize(torch.from_numpy(acc), b, c, qmin, qmax, axis=1)
    assert got_np.dtype == np.int32 and got_torch.dtype == torch.int32
    np.testing.assert_array_equal(got_np, expected)
    np.testing.assert_array_equal(got_torch.numpy(), expected)


def test_ties_round_half_to_even_like_quantize_linear() -> None:
    b, c = dyadic(0.5)  # exactly 1/2
    assert Fraction(b, 2**c) == Fraction(1, 2)
    acc = np.array([5, -5, 3, -3, 1, -1, 0, 7, -7])
    expected = [2, -2, 2, -2, 0, 0, 0, 4, -4]  # 2.5, -2.5, 1.5, -1.5, 0.5, -0.5, 0, 3.5, -3.5
    assert requantize(acc, b, c, -100, 100).tolist() == expected
    assert requantize(torch.tensor(acc), b, c, -100, 100).tolist() == expected
    assert np.rint(acc / 2).tolist() == expected  # numpy's (and ONNX QuantizeLinear's) rule


def test_round_shift_is_half_to_even_near_every_tie() -> None:
    c = np.arange(1, 40, dtype=np.int64)
    for q in (-3, -2, -1, 0, 1, 2, 3, 2**20 + 1):
        for r in (-1, 0, 1):  # just below, at and just above the tie q + 1/2
            x = (2 * q + 1) * (np.int64(1) << (c - 1)) + r
            expected = [round(Fraction(int(v), 2 ** int(k))) for v, k in zip(x, c)]
            assert round_shift(x, c, rounding_bias(c)).tolist() == expected


def test_per_channel_axis_and_clipping() -> None:
    b, c = dyadic_per_channel([1.0, 0.25, 2.0])
    acc = np.array([[[10]], [[10]], [[100]]])  # (C, 1, 1)
    assert requantize(acc, b, c, -128, 127, axis=0).ravel().tolist() == [10, 2, 127]  # 2.5 -> 2
    relu4 = requantize(np.array([-7, 3, 40]), *dyadic(1.0), 0, 15)
    assert relu4.tolist() == [0, 3, 15]


def test_scale_ratio_is_the_exact_ratio_of_the_float32_scales() -> None:
    s_in, s_w, s_out = 0.1, np.array([0.3, 0.7]), 0.05
    got = scale_ratio(s_in, s_w, s_out)
    exact = [Fraction(float(np.float32(s_in))) * Fraction(float(np.float32(w))) / Fraction(float(np.float32(s_out)))
             for w in s_w]
    assert all(abs(Fraction(float(g)) - e) <= e / 2**52 for g, e in zip(got, exact))
    float32_product = np.float64(np.float32(s_in) * np.float32(s_w)) / np.float64(np.float32(s_out))
    assert not np.array_equal(got, float32_product)  # no intermediate float32 rounding
    assert not np.array_equal(got, s_in * s_w / s_out)  # the file's float32 scales, not the float64 inputs


def test_dyadic_mantissa_carry_stays_in_range() -> None:
    assert dyadic(np.nextafter(1.0, 0.0)) == (2**30, 30)  # m * 2^31 rounds up to 2^31
    assert dyadic(np.nextafter(2.0**-32, 0.0)) == (2**30, 62)  # the carry brings c back to 62
    with pytest.raises(ValueError, match="c=0"):
        dyadic(np.nextafter(2.0**30, 0.0))  # the carry pushes c below 1


@pytest.mark.parametrize(
    ("ratio", "message"),
    [
        (0.0, "must be > 0"),
        (-0.5, "must be > 0"),
        (float("nan"), "must be finite"),
        (float("inf"), "must be finite"),
        (2.0**30, r"shift c=\d+ outside \[1, 62\]"),
        (2.0**-33, r"shift c=\d+ outside \[1, 62\]"),
    ],
)
def test_dyadic_rejects_bad_ratios(ratio: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dyadic(ratio)
    with pytest.raises(ValueError, match=message):
        dyadic_per_channel([1.0, ratio])


@pytest.mark.parametrize(
    ("acc", "b", "c", "qmin", "qmax", "message"),
    [
        (np.array([2**33], dtype=np.int64), 2**31 - 1, 40, -128, 127, "overflows the int64 product"),
        (torch.tensor([-(2**40)]), 2**30, 31, -128, 127, "overflows the int64 product"),
        (np.array([1.5]), 2**30, 31, -128, 127, "integer dtype"),
        (torch.tensor([1.5]), 2**30, 31, -128, 127, "integer dtype"),
        (np.array([1]), 2**31, 31, -128, 127, r"b must be in \[0, 2\^31\)"),
        (np.array([1]), 2**30, 0, -128, 127, r"c must be in \[1, 62\]"),
        (np.array([1]), 2**30, 63, -128, 127, r"c must be in \[1, 62\]"),
        (np.array([1]), 0.5, 31, -128, 127, "must be integers"),
        (np.array([1]), 2**30, 31, 127, -128, "qmin <= qmax"),
    ],
)
def test_requantize_rejects_bad_input(acc, b, c, qmin, qmax, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        requantize(acc, b, c, qmin, qmax)


def test_int32_accumulators_never_overflow() -> None:
    acc = np.array([-(2**31), 2**31 - 1], dtype=np.int32)
    got = requantize(acc, 2**31 - 1, 62, -(2**31), 2**31 - 1)
    assert got.tolist() == [round_half_even(Fraction(int(a) * (2**31 - 1), 2**62)) for a in acc]


def test_self_check_finds_no_mismatch() -> None:
    assert self_check(2_000, seed=1) == 0


def test_offset_is_added_below_the_grid_before_the_one_rounding() -> None:
    rng = np.random.default_rng(3)
    b, c = dyadic_per_channel(rng.uniform(1e-4, 1e-1, 5))
    offset = rng.integers(-(2**30), 2**30, 5)
    acc = rng.integers(-(2**20), 2**20, (7, 5, 2))
    expected = np.array([[[round(Fraction(int(a) * int(b[o]) + int(offset[o]), 2 ** int(c[o]))) for a in acc[n, o]]
                          for o in range(5)] for n in range(7)])
    for x in (acc, torch.from_numpy(acc)):
        got = requantize(x, b, c, -(2**31), 2**31 - 1, axis=1, offset=offset)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_bias_fraction_is_what_a_float32_bias_scale_means() -> None:
    s_in, s_w = np.float32(0.0123), np.array([0.0071, 0.0033], np.float32)
    bias_scale = (s_in * s_w).astype(np.float32)  # how a QDQ file stores it
    bias = np.array([123_456, -7], np.int32)
    whole, fraction = bias_in_accumulator(bias, bias_scale, s_in, s_w)
    exact = [Fraction(int(v)) * Fraction(float(bs)) / (Fraction(float(s_in)) * Fraction(float(w)))
             for v, bs, w in zip(bias, bias_scale, s_w)]
    assert whole.tolist() == [round(e) for e in exact]
    assert all(abs(Fraction(float(f)) - (e - round(e))) < Fraction(1, 10**9) for f, e in zip(fraction, exact))
    assert fraction[0] != 0  # float32(S_in * S_w) is not S_in * S_w


def _high_word_requantize(acc: np.ndarray, form: tuple[np.ndarray, np.ndarray], b: np.ndarray, qmin: int,
                          qmax: int) -> np.ndarray:
    d, s = form
    return np.clip(high_word_shift(acc * b + d, s, lambda v: v.astype(np.int32)), qmin, qmax)


def test_high_word_form_equals_requantize_where_it_is_offered() -> None:
    rng = np.random.default_rng(4)
    offered = 0
    for trial in range(300):
        b, c = dyadic_per_channel(np.exp2(rng.uniform(-16, -1, 3)))
        zeros = rng.integers(0, 12, 3)  # trailing zero bits in b: ties more frequent
        b = b.astype(np.int64) >> zeros << zeros if trial % 2 else b.astype(np.int64)
        offset, zero_point = rng.integers(-(2**40), 2**40, 3), int(rng.integers(-3, 4))
        lo, hi = -rng.integers(0, 2**14, 3), rng.integers(0, 2**14, 3)
        form = high_word_form(b, c, offset, zero_point, lo, hi)
        if form is None:
            continue
        offered += 1
        acc = np.concatenate([np.stack([lo, hi]), rng.integers(lo, hi + 1, (500, 3))])
        expected = requantize(acc, b, c, -128, 127, axis=1, zero_point=zero_point, offset=offset)
        np.testing.assert_array_equal(_high_word_requantize(acc, form, b, -128, 127), expected)
    assert offered > 250


def test_high_word_form_is_refused_where_a_tie_lies_in_range() -> None:
    b, c = np.array([3 << 28]), np.array([40])  # b = 3 * 2^28: ties every 2^12 accumulator values
    offset = np.array([0])
    acc = np.arange(-(2**13), 2**13)
    ties = (acc * int(b[0]) + int(offset[0])) % 2**40 == 2**39
    assert ties.any()
    assert high_word_form(b, c, offset, 0, [-(2**13)], [2**13 - 1]) is None
    half_up = high_word_form(b, c, offset, 0, [0], [0])  # acc = 0 is no tie: offered
    assert half_up is not None
    # forced on the whole range, the cheaper form rounds ties half up: wrong at every tie above an even step
    forced = (np.array([2**39]), np.array([8], np.int32))
    wrong = _high_word_requantize(acc[:, None], forced, b, -(2**31), 2**31 - 1)[:, 0] != requantize(
        acc, b, c, -(2**31), 2**31 - 1)
    assert wrong[ties].any() and not wrong[~ties].any()


@pytest.mark.parametrize("b", [1, 6, 7, 40, 96, 1 << 9])
def test_tie_search_agrees_with_brute_force(b: int) -> None:
    c = 10
    for offset in range(-40, 40, 7):
        for lo in range(-30, 30, 11):
            for hi in (lo - 1, lo, lo + 5, lo + 600):
                brute = any((x * b + offset) % 2**c == 2 ** (c - 1) for x in range(lo, hi + 1))
                assert _tie_in_range(b, c, offset, lo, hi) == brute, (b, offset, lo, hi)


def test_high_word_form_is_refused_for_small_shifts_and_overflow() -> None:
    b, c = dyadic_per_channel(np.array([0.3]))  # c = 32: offered on a small range
    assert high_word_form(b, c, [0], 0, [-100], [100]) is not None
    b, c = dyadic_per_channel(np.array([3.0]))  # c = 29 < 32
    assert high_word_form(b, c, [0], 0, [-100], [100]) is None
    b, c = dyadic_per_channel(np.array([2.0**-20]))
    assert high_word_form(b, c, [0], 0, [-(2**33)], [2**33]) is None  # |acc| * b beyond int64


def test_high_word_sum_form_equals_requantize_of_the_sum() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        (m1, m2), c = aligned_multipliers([np.float32(rng.uniform(0.01, 0.2)), np.float32(rng.uniform(0.01, 0.2))],
                                          np.float32(rng.uniform(0.05, 0.3)), [256, 256])
        zero_points, zero_point = [int(rng.integers(-5, 6)), 0], int(rng.integers(-3, 4))
        d = high_word_sum_form([int(m1), int(m2)], zero_points, c, zero_point, [(-128, 127), (0, 255)])
        assert d is not None
        x1, x2 = np.meshgrid(np.arange(-128, 128), np.arange(0, 256))
        expected = requantize((x1 - zero_points[0]) * int(m1) + (x2 - zero_points[1]) * int(m2), 1, c, -128, 127,
                              zero_point=zero_point)
        got = np.clip(high_word_shift(x1 * int(m1) + x2 * int(m2) + d, c - 32, lambda v: v.astype(np.int32)), -128, 127)
        np.testing.assert_array_equal(got, expected)


def test_high_word_sum_form_is_refused_on_ties_and_many_combinations() -> None:
    c = 50
    half, unit = 1 << (c - 1), 1 << c  # an input at half the output's scale: odd values are ties
    assert high_word_sum_form([half, unit], [0, 0], c, 0, [(-128, 127), (-128, 127)]) is None
    assert high_word_sum_form([unit + 12345, unit], [0, 0], c, 0, [(-128, 127), (-128, 127)]) is not None
    three = [(-128, 127)] * 3  # 65536 combinations of the first two inputs: not searched
    assert high_word_sum_form([unit + 12345, unit, unit], [0, 0, 0], c, 0, three) is None


def test_int32_sum_form_equals_requantize_of_the_sum_and_stays_in_int32() -> None:
    rng = np.random.default_rng(11)
    x1, x2 = (v.ravel() for v in np.meshgrid(np.arange(-128, 128), np.arange(0, 256)))
    found = 0
    for _ in range(30):
        scales = [np.float32(rng.uniform(0.01, 0.2)), np.float32(rng.uniform(0.01, 0.2))]
        (m1, m2), c = aligned_multipliers(scales, np.float32(rng.uniform(0.05, 0.3)), [256, 256])
        zero_points, zero_point = [int(rng.integers(-5, 6)), int(rng.integers(0, 20))], int(rng.integers(-3, 4))
        form = int32_sum_form([int(m1), int(m2)], zero_points, c, zero_point, [(-128, 127), (0, 255)], -128, 127)
        if form is None:
            continue
        found += 1
        (n1, n2), d, k = form.multipliers, form.d, form.shift
        assert abs(d) + 128 * abs(n1) + 255 * abs(n2) < 2**31
        expected = requantize((x1 - zero_points[0]) * int(m1) + (x2 - zero_points[1]) * int(m2), 1, c, -128, 127,
                              zero_point=zero_point)
        got = np.clip((x1 * n1 + x2 * n2 + d).astype(np.int32) >> k, -128, 127)
        np.testing.assert_array_equal(got, expected)
    assert found >= 25


def test_int32_sum_form_is_refused_where_half_to_even_ties_occur() -> None:
    c = 50
    half, unit = 1 << (c - 1), 1 << c  # odd inputs at half the output's scale land on ties
    assert int32_sum_form([half, unit], [0, 0], c, 0, [(-128, 127)] * 2, -128, 127) is None
    assert int32_sum_form([half + 12345, unit], [0, 0], c, 0, [(-128, 127)] * 2, -128, 127) is not None


def test_aligned_sum_rounds_exact_ties_of_the_real_sum_half_to_even() -> None:
    """Ratios 1/6 and 1/2 (scales 2^-8, 3*2^-8 to 3*2^-7): x1/6 + x2/2 lies exactly on a tie for many
    pairs, but the multipliers 2^c/6 are not integers, so the integer sum misses the tie by a few units. The
    tie window rounds every pair like exact arithmetic (without it some ties round the wrong way), and the
    high-word form, which rounds half up, is refused."""
    scales, s_out = [np.float32(2.0**-8), np.float32(3 * 2.0**-8)], np.float32(3 * 2.0**-7)
    multipliers, c = aligned_multipliers(scales, s_out, [256, 256])
    window = tie_window(scales, s_out, [256, 256], multipliers, c)
    assert window > 0
    x1, x2 = (v.ravel() for v in np.meshgrid(np.arange(-128, 128), np.arange(-128, 128)))
    total = x1 * np.int64(multipliers[0]) + x2 * np.int64(multipliers[1])
    exact = np.array([round(Fraction(int(a), 6) + Fraction(int(b), 2)) for a, b in zip(x1, x2)])  # half to even
    np.testing.assert_array_equal(requantize(total, 1, c, -1000, 1000, tie_window=window), exact)
    assert np.count_nonzero(requantize(total, 1, c, -1000, 1000) != exact) > 0
    assert high_word_sum_form([int(m) for m in multipliers], [0, 0], c, 0, [(-128, 127)] * 2, window) is None


def test_no_tie_window_where_the_real_sum_cannot_be_on_a_tie() -> None:
    scales, s_out = [np.float32(2.0**-8), np.float32(3 * 2.0**-8)], np.float32(3 * 2.0**-9)  # ratios 4/3 and 4
    multipliers, c = aligned_multipliers(scales, s_out, [256, 256])
    assert tie_window(scales, s_out, [256, 256], multipliers, c) == 0


@pytest.mark.parametrize("s_in, s_out, divisors", [
    (0.0123, 0.0123, 36),  # one scale in and out: every sum of 18 (mod 36) is a tie
    (0.0123, 0.0369, 16),
    (0.0171, 0.0123, 9),  # ties only at sums beyond the range: no window
    (0.05, 0.0071, [[9, 6], [6, 4]]),  # a divisor per output position
])
def test_pool_multipliers_round_every_window_sum_exactly_half_to_even(s_in: float, s_out: float, divisors) -> None:  # type: ignore[no-untyped-def]
    magnitude = int(np.max(divisors)) * 255
    m, c, window = pool_multipliers(np.float32(s_in), np.float32(s_out), np.asarray(divisors), magnitude)
    sums = np.arange(-magnitude, magnitude + 1, dtype=np.int64)
    ratio = Fraction(float(np.float32(s_in))) / Fraction(float(np.float32(s_out)))
    for d, mk in zip(np.ravel(divisors), np.ravel(m)):
        got = requantize(sums * int(mk), 1, c, -(2**31), 2**31 - 1, tie_window=window)
        assert got.tolist() == [round(int(x) * ratio / int(d)) for x in sums]  # round(): half to even


def test_exact_requantization_rounds_every_accumulator_as_its_real_value() -> None:
    """Per channel, float32 scales whose 31-bit b rounds some accumulator 1e-8 steps from a boundary the other
    way (the first channel: acc +-10987 is +-58.49999999 steps, b gives +-59) and random ones with a bias fraction:
    with the constants of ``exact_requantization`` every accumulator of the output range rounds as
    ``(acc + fraction) * ratio`` does exactly."""
    rng = np.random.default_rng(0)
    s_in, s_out = np.float32(2.0**-3), np.float32(0.16568836569786072)
    s_w = np.concatenate([[0.007057627663016319], rng.uniform(0.004, 0.009, 5)]).astype(np.float32)
    fraction = np.concatenate([[0.0], rng.uniform(-0.5, 0.5, 5)])
    ratios = [Fraction(float(s_in)) * Fraction(float(w)) / Fraction(float(s_out)) for w in s_w]
    b, c = dyadic_per_channel([float(r) for r in ratios])
    offset = fraction_offset(fraction, b)
    acc = np.arange(-17000, 17000)
    before, after = [], []
    fixed_b, fixed_offset = exact_requantization(ratios, fraction, b, c, offset, -128, 127)
    for k, r in enumerate(ratios):
        exact = np.clip([round((int(a) + Fraction(float(fraction[k]))) * r) for a in acc], -128, 127)
        before.append(np.count_nonzero(requantize(acc, b[k], c[k], -128, 127, offset=offset[k]) != exact))
        after.append(np.count_nonzero(requantize(acc, fixed_b[k], c[k], -128, 127, offset=fixed_offset[k]) != exact))
    assert before[0] == 2 and after == [0] * len(ratios)
