"""Each number format against an independent reference written here (tables, slow loops)."""

import itertools

import numpy as np
import pytest
import torch

from wkvaq_quant.config import QuantArgs
from wkvaq_quant.formats import (
    BITMOD_GRIDS,
    FP4_E2M1_VALUES,
    double_quantize_scales,
    get_format,
    round_fp4_e2m1_,
    round_fp8_e4m3_,
    round_ufloat_,
)
from wkvaq_quant.quantize import fake_quantize, quantize

f32 = np.float32


def _groups(seed, rows=3, n_groups=4, gs=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n_groups * gs, generator=g) * scale


# ---------------------------------------------------------------- int: slow loops in fp32 ---
def _ref_int_asym(x, bits, gs):
    qmax = f32(2**bits - 1)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for g0 in range(0, x.shape[1], gs):
            grp = x[r, g0 : g0 + gs]
            lo, hi = f32(grp.min()), f32(grp.max())
            s = f32(hi - lo) / qmax if hi > lo else f32(abs(lo))
            s = max(s, f32(np.finfo(np.float32).tiny))
            z = min(max(np.rint(f32(-lo) / s), f32(0)), qmax)
            for i, v in enumerate(grp):
                q = min(max(np.rint(f32(v) / s) + z, f32(0)), qmax)
                out[r, g0 + i] = f32(q - z) * s
    return out


def _ref_int_sym(x, bits, gs):
    qmax = f32(2 ** (bits - 1) - 1)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for g0 in range(0, x.shape[1], gs):
            grp = x[r, g0 : g0 + gs]
            s = max(f32(np.abs(grp).max()) / qmax, f32(np.finfo(np.float32).tiny))
            for i, v in enumerate(grp):
                out[r, g0 + i] = min(max(np.rint(f32(v) / s), -qmax), qmax) * s
    return out


def _ref_int_float_zero(x, bits, gs):
    qmax = f32(2**bits - 1)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for g0 in range(0, x.shape[1], gs):
            grp = x[r, g0 : g0 + gs]
            lo, hi = f32(grp.min()), f32(grp.max())
            s = f32(hi - lo) / qmax if hi > lo else f32(abs(lo))
            s = max(s, f32(np.finfo(np.float32).tiny))
            for i, v in enumerate(grp):
                q = min(max(np.rint(f32(f32(v) - lo) / s), f32(0)), qmax)
                out[r, g0 + i] = f32(q * s) + lo
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [16, 64])
def test_int_asym_matches_slow_loop(bits, gs):
    x = _groups(bits, gs=16)
    got = fake_quantize(x, QuantArgs(bits=bits, group_size=gs))
    np.testing.assert_array_equal(got.numpy(), _ref_int_asym(x.numpy(), bits, gs))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_sym_matches_slow_loop(bits):
    x = _groups(10 + bits)
    got = fake_quantize(x, QuantArgs(bits=bits, group_size=16, symmetric=True))
    np.testing.assert_array_equal(got.numpy(), _ref_int_sym(x.numpy(), bits, 16))


@pytest.mark.parametrize("bits", [2, 4])
def test_int_float_zero_matches_slow_loop(bits):
    x = _groups(20 + bits) + 0.3  # groups not centred on 0
    args = QuantArgs(bits=bits, group_size=16, zero_point="float", target="key")
    np.testing.assert_array_equal(fake_quantize(x, args).numpy(), _ref_int_float_zero(x.numpy(), bits, 16))


def test_int_codes_and_zero_point_ranges():
    x = _groups(3)
    r = quantize(x, QuantArgs(bits=4, group_size=16))
    codes = torch.round(r.x_hat.view(3, 4, 16) / r.scale[..., None]) + r.zero[..., None]
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(r.zero, r.zero.round()) and r.zero.min() >= 0 and r.zero.max() <= 15
    rs = quantize(x, QuantArgs(bits=4, group_size=16, symmetric=True))
    codes = torch.round(rs.x_hat.view(3, 4, 16) / rs.scale[..., None])
    assert codes.abs().max() == 7  # symmetric range [-7, 7]; -8 is never produced
    assert rs.zero is None


# ------------------------------------------------------------------- fp8 vs torch dtype ---
def _all_fp8_values():
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(v[torch.isfinite(v)])


def test_fp8_rounding_equals_torch_float8_e4m3fn():
    vals = _all_fp8_values()
    assert vals.numel() == 253 and vals.max() == 448  # +-0 collapse, NaN excluded
    mids = (vals[1:] + vals[:-1]) / 2  # every tie
    probes = torch.cat([vals, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    probes = torch.cat([probes, torch.randn(20000) * 50, torch.rand(5000) * 2**-6, torch.randn(2000) * 1e-4])
    ref = probes.to(torch.float8_e4m3fn).float()
    assert torch.equal(round_fp8_e4m3_(probes.clone()), ref)


def test_fp8_saturates_beyond_448():
    y = torch.tensor([464.0, 479.0, 500.0, 1e6, -1e30, -449.0])
    ref = y.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(round_fp8_e4m3_(y.clone()), ref)
    assert torch.equal(ref.abs(), torch.full_like(ref, 448.0))


def test_fp8_per_token_scales_row_amax_to_448():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 96, generator=g) * torch.logspace(-30, 30, 400)[:, None]  # no clamp needed
    r = quantize(x, QuantArgs(bits=8, dtype="fp8_e4m3", target="activation"))
    s = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(r.scale, s)
    assert torch.equal(r.x_hat, (x / s).to(torch.float8_e4m3fn).float() * s)


# ---------------------------------------------------------------------------- fp4 e2m1 ---
FP4_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # code = exponent<<1 | mantissa


def _ref_fp4(v):
    """Nearest FP4 value by enumeration; ties to the even code (round-to-nearest-even)."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(a - FP4_TABLE[c]), c % 2))
    return float(np.copysign(FP4_TABLE[best], v))


def test_fp4_table_and_rounding():
    assert tuple(FP4_E2M1_VALUES) == tuple(FP4_TABLE)
    vals = torch.tensor(FP4_TABLE)
    mids = (vals[1:] + vals[:-1]) / 2
    probes = torch.cat([vals, -vals, mids, -mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    probes = torch.cat([probes, torch.tensor([6.5, 7.0, 100.0, -9.0]), torch.randn(3000) * 3])
    got = round_fp4_e2m1_(probes.clone())
    ref = torch.tensor([_ref_fp4(v) for v in probes.tolist()])
    assert torch.equal(got, ref)
    # ties go to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_fp4_e2m1_(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_fp4_per_group_scale():
    x = _groups(5, gs=32)
    r = quantize(x, QuantArgs(bits=4, dtype="fp4_e2m1", group_size=32))
    s = x.view(3, 4, 32).abs().amax(-1) / 6
    assert torch.equal(r.scale, s)
    y = (x.view(3, 4, 32) / s[..., None]).flatten()
    ref = torch.tensor([_ref_fp4(v) for v in y.tolist()]).view(3, 4, 32) * s[..., None]
    assert torch.equal(r.x_hat, ref.view(3, 128))


# ------------------------------------------------------------------------------ bitmod ---
BITMOD_TABLE = {  # literal grids (paper / BitMoD reference): +ER, -ER, +EA, -EA
    3: [
        [-4, -2, -1, 0, 1, 2, 3, 4],
        [-4, -3, -2, -1, 0, 1, 2, 4],
        [-4, -2, -1, 0, 1, 2, 4, 6],
        [-6, -4, -2, -1, 0, 1, 2, 4],
    ],
    4: [
        [-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 10, 12],
        [-12, -10, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12],
        [-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12, 16],
        [-16, -12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12],
    ],
}


def test_bitmod_grid_tables():
    for bits, grids in BITMOD_TABLE.items():
        assert [list(g) for g in BITMOD_GRIDS[bits]] == [[float(v) for v in g] for g in grids]


def _ref_bitmod_group(grp, grid):
    """Quantize one group (fp32 numpy) to one grid: nearest value, ties to the lower value."""
    grid = np.asarray(grid, dtype=np.float32)
    s = max(f32(np.abs(grp).max()) / f32(np.abs(grid).max()), f32(np.finfo(np.float32).tiny))
    out = np.empty_like(grp)
    for i, v in enumerate(grp):
        y = f32(v) / s
        out[i] = grid[int(np.argmin(np.abs(grid - y)))] * s  # argmin: first (lower) on ties
    return out, float(np.sum((grp.astype(np.float64) - out) ** 2))


@pytest.mark.parametrize("bits", [3, 4])
def test_bitmod_matches_brute_force_reference(bits):
    x = torch.cat([_groups(30 + bits, rows=8, n_groups=8, gs=32), _groups(1, rows=8, n_groups=8, gs=32) ** 3], 0)
    r = quantize(x, QuantArgs(bits=bits, dtype="bitmod", group_size=32))
    xn, got = x.numpy(), r.x_hat.numpy()
    for row, gi in itertools.product(range(x.shape[0]), range(8)):
        grp = xn[row, gi * 32 : (gi + 1) * 32]
        cands = [_ref_bitmod_group(grp, g) for g in BITMOD_TABLE[bits]]
        errs = [e for _, e in cands]
        k = int(r.grid[row, gi])
        assert errs[k] <= min(errs) * (1 + 1e-5) + 1e-12, (row, gi, errs, k)
        np.testing.assert_array_equal(got[row, gi * 32 : (gi + 1) * 32], cands[k][0])


@pytest.mark.parametrize(
    "bits, group, expect",
    [
        (3, [4, 3, 3, 3, -1, 0, 2, 3], 0),  # needs +3
        (3, [-4, -3, -3, -3, 1, 0, -2, -3], 1),  # needs -3
        (3, [6, 4, 4, 2, -1, 0, 1, 6], 2),  # needs +6 at amax/6 scale
        (3, [-6, -4, -4, -2, 1, 0, -1, -6], 3),  # needs -6
        (4, [12, 10, 10, 8, -6, 0, 1, 10], 0),
        (4, [-12, -10, -10, -8, 6, 0, -1, -10], 1),
        (4, [16, 12, 8, -12, 6, 0, 1, 16], 2),
        (4, [-16, -12, -8, 12, -6, 0, -1, -16], 3),
        (3, [0, 0, 0, 0], 0),  # all ties: the first grid
    ],
)
def test_bitmod_picks_the_known_best_grid(bits, group, expect):
    x = torch.tensor([group], dtype=torch.float32) * 0.37
    r = quantize(x, QuantArgs(bits=bits, dtype="bitmod", group_size=len(group)))
    assert int(r.grid[0, 0]) == expect
    if any(group):
        torch.testing.assert_close(r.x_hat, x, rtol=1e-6, atol=0)  # exactly representable


def test_bitmod_rounds_ties_to_lower_value():
    # 3-bit +ER grid at scale 1 (amax 4): 2.5 -> 2, 3.5 -> 3, -1.5 -> -2, 0.5 -> 0, -0.5 -> -1
    x = torch.tensor([[4.0, 2.5, 3.5, -1.5, 0.5, -0.5] + [3.0] * 10])
    r = quantize(x, QuantArgs(bits=3, dtype="bitmod", group_size=16))
    assert int(r.grid[0, 0]) == 0
    assert r.x_hat.tolist() == [[4.0, 2.0, 3.0, -2.0, 0.0, -1.0] + [3.0] * 10]


# -------------------------------------------------------- ufloat (attention probabilities) ---
def _ufloat_table(exp_bits, man_bits):
    bias = 2**exp_bits - 1
    vals = set()
    for e, m in itertools.product(range(2**exp_bits), range(2**man_bits)):
        frac = m / 2**man_bits
        vals.add(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    return np.array(sorted(vals))


def _ref_ufloat(y, table):
    """Nearest table value; ties to the larger value (round half up); clamp to [0, max]."""
    y = min(max(float(y), 0.0), table[-1])
    i = int(np.searchsorted(table, y))
    if i == 0:
        return table[0]
    if i == len(table):
        return table[-1]
    lo, hi = table[i - 1], table[i]
    return hi if (y - lo) >= (hi - y) else lo


@pytest.mark.parametrize("bits, exp_bits, man_bits", [(8, 4, 4), (12, 5, 7)])
def test_ufloat_against_enumerated_table(bits, exp_bits, man_bits):
    table = _ufloat_table(exp_bits, man_bits)
    assert len(table) == 2 ** (exp_bits + man_bits)  # every code distinct (no sign, no inf/NaN)
    assert 1.0 in table and table[-1] == 2 - 2.0**-man_bits
    t = torch.tensor(table, dtype=torch.float32)
    mids = (t[1:] + t[:-1]) / 2
    probes = torch.cat([t, mids, torch.nextafter(mids, mids - 1), torch.nextafter(mids, mids + 1)])
    probes = torch.cat([probes, torch.rand(3000), torch.rand(1000) * 1e-4, torch.tensor([-0.5, 2.5, 0.0])])
    got = round_ufloat_(probes.clone(), bits)
    ref = torch.tensor([_ref_ufloat(v, table) for v in probes.tolist()], dtype=torch.float32)
    assert torch.equal(got, ref)


def test_ufloat8_underflow_is_gradual_then_flushes():
    tiny = 2.0**-18  # smallest E4M4 subnormal
    y = torch.tensor([2.0**-14, 3 * tiny, tiny, tiny / 2, np.nextafter(f32(tiny / 2), f32(0)), 1e-9, 0.0])
    got = round_ufloat_(y.clone(), 8).tolist()
    assert got == [2.0**-14, 3 * tiny, tiny, tiny, 0.0, 0.0, 0.0]


def test_ufloat8_is_fp16_with_mantissa_rounded_half_up():
    # P in FP16: E4M4 == drop the 6 low mantissa bits of the FP16 encoding, rounding half up
    p = torch.rand(5000).half()
    p = torch.cat([p, torch.tensor([1.0, 2.0**-14, 2.0**-20, 0.0], dtype=torch.float16)])
    bits = p.view(torch.int16).int()
    ref = ((bits + (1 << 5)) & ~((1 << 6) - 1)).short().view(torch.float16).float()
    assert torch.equal(round_ufloat_(p.float(), 8), ref)


def test_ufloat_fake_quantize_keeps_dtype_and_shape():
    p = torch.softmax(torch.randn(2, 4, 16, 16), dim=-1).to(torch.bfloat16)
    out = fake_quantize(p, QuantArgs(bits=8, dtype="ufloat", target="prob"))
    assert out.dtype == torch.bfloat16 and out.shape == p.shape
    assert torch.equal(out, round_ufloat_(p.float(), 8).to(torch.bfloat16))


# ------------------------------------------------------------------- double quantization ---
def test_double_quantize_scales_reference():
    s = torch.tensor([[0.5, 0.25, 1e-6, 0.0], [3.0, 3.0, 1.5, 0.011]])
    dq = double_quantize_scales(s)
    s2 = s.amax(1, keepdim=True) / 255
    assert torch.equal(dq.scale2, s2)
    code = torch.round(s / s2).clamp(1, 255)
    assert torch.equal(dq.code, code.to(torch.uint8))
    assert torch.equal(dq.scale_hat, code * s2)
    assert (dq.scale_hat > 0).all()


@pytest.mark.parametrize("dtype, bits", [("int", 4), ("fp4_e2m1", 4), ("bitmod", 3), ("fp8_e4m3", 8)])
def test_double_quant_applies_uint8_scales(dtype, bits):
    x = _groups(7, rows=4, n_groups=6, gs=32)
    args = QuantArgs(bits=bits, dtype=dtype, group_size=32, double_quant=True)
    r = quantize(x, args)
    assert r.scale_code.dtype == torch.uint8 and r.scale_code.shape == (4, 6) and r.scale2.shape == (4, 1)
    assert torch.equal(r.scale, r.scale_code.float() * r.scale2)
    assert int(r.scale_code.max()) == 255
    plain = quantize(x, args.replace(double_quant=False))
    assert torch.isfinite(r.x_hat).all()
    assert (r.x_hat - x).pow(2).mean() < 1.5 * (plain.x_hat - x).pow(2).mean()


# ------------------------------------------------------- minifloat rounding near the ties ---
def test_minifloat_rounding_helpers_are_exact_near_ties():
    from wkvaq_quant.formats.minifloat import round_half_up_, round_rne_, round_ties_down_

    # grid: 1 mantissa bit, emin 0 (FP4-like): multiples of 0.5 below 2, step 2^(e-1) above
    steps = np.array([0.5] * 4 + [1.0] * 2 + [2.0] * 2)
    bases = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mids = bases + steps / 2
    y = []
    for m in np.concatenate([mids, -mids]):
        m32 = f32(m)
        y += [m32, np.nextafter(m32, f32(np.inf)), np.nextafter(m32, f32(-np.inf))]
    y = torch.tensor(np.array(y, dtype=np.float32))
    yd = y.double().numpy()
    e = np.floor(np.log2(np.maximum(np.abs(yd), 1.0)))
    step = 2.0 ** (e - 1)
    z = yd / step  # exact in float64
    np.testing.assert_array_equal(round_ties_down_(y.clone(), 1, 0).numpy(), np.ceil(z - 0.5) * step)
    np.testing.assert_array_equal(round_half_up_(y.clone(), 1, 0).numpy(), np.floor(z + 0.5) * step)
    np.testing.assert_array_equal(round_rne_(y.clone(), 1, 0).numpy(), np.rint(z) * step)


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, group_size=16), QuantArgs(bits=3, group_size=16, symmetric=True),
    QuantArgs(bits=4, group_size=16, zero_point="float"), QuantArgs(bits=3, dtype="bitmod", group_size=16),
    QuantArgs(bits=4, dtype="bitmod", group_size=16), QuantArgs(bits=4, dtype="fp4_e2m1", group_size=16),
    QuantArgs(bits=8, dtype="fp8_e4m3", group_size=16),
], ids=lambda a: f"{a.dtype}{a.bits}{'sym' if a.symmetric else ''}{a.zero_point}")
def test_bound_apply_equals_apply_column_by_column(args):
    """bind(qp) (GPTQ's per-column path) writes what apply writes, bit for bit, on every column of
    the groups it was bound to, called repeatedly."""
    fmt = get_format(args.dtype)
    g = torch.randn(12, 1, 16, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 4, 12).view(-1, 1, 1)
    qp = fmt.choose_qparams(g, args)
    full = torch.empty_like(g)
    fmt.apply(g, qp, args, full)
    f = fmt.bind(qp, args)
    for c in range(16):
        out = torch.full((12, 1, 1), float("nan"))
        f(g[..., c: c + 1].contiguous(), out)
        assert torch.equal(out, full[..., c: c + 1]), c
    assert not torch.equal(full, g)  # the groups were really quantized
