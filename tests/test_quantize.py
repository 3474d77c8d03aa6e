"""fake_quantize / quantize: layouts, group-size rule, dtypes, idempotence, error bound, edge cases."""

import pytest
import torch

from wkvaq_quant.config import QuantArgs
from wkvaq_quant.quantize import fake_quantize, quantize

ALL_FORMATS = [
    QuantArgs(bits=4, group_size=32),
    QuantArgs(bits=3, group_size=32, symmetric=True),
    QuantArgs(bits=4, group_size=32, zero_point="float"),
    QuantArgs(bits=8, dtype="fp8_e4m3", group_size=32),
    QuantArgs(bits=4, dtype="fp4_e2m1", group_size=32),
    QuantArgs(bits=3, dtype="bitmod", group_size=32),
    QuantArgs(bits=4, dtype="bitmod", group_size=32),
    QuantArgs(bits=4, dtype="bitmod", group_size=32, double_quant=True),
    QuantArgs(bits=8, dtype="ufloat", target="prob"),
    QuantArgs(bits=12, dtype="ufloat", target="prob"),
]
IDS = [f"{a.dtype}{a.bits}{'-sym' if a.symmetric else ''}-{a.zero_point}{'-dq' if a.double_quant else ''}" for a in ALL_FORMATS]


def _x(shape=(8, 96), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _input_for(args, shape=(8, 96), seed=0):
    x = _x(shape, seed)
    return torch.softmax(x, dim=-1) if args.target == "prob" else x


def test_bits_16_is_identity_and_returns_input():
    x = _x()
    for args in (QuantArgs(bits=16, group_size=32), QuantArgs(bits=16, dtype="ufloat", target="prob")):
        assert fake_quantize(x, args) is x
        assert quantize(x, args).scale is None


@pytest.mark.parametrize("args", ALL_FORMATS, ids=IDS)
def test_idempotent(args):
    x = _input_for(args)
    once = quantize(x, args)
    twice = quantize(once.x_hat, args)
    if once.grid is not None:
        assert torch.equal(once.grid, twice.grid)
    # same codes; the recomputed scale may differ from the first in the last bit
    torch.testing.assert_close(twice.x_hat, once.x_hat, rtol=4e-7, atol=1e-30)
    if args.dtype == "ufloat":
        assert torch.equal(twice.x_hat, once.x_hat)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int_error_at_most_half_step_inside_range(bits, symmetric):
    x = _x((16, 256), seed=bits)  # every group of 64 straddles 0, so every x is inside the range
    r = quantize(x, QuantArgs(bits=bits, group_size=64, symmetric=symmetric))
    err = (x - r.x_hat).abs().view(16, 4, 64)
    bound = r.scale[..., None] / 2
    assert (err <= bound * (1 + 1e-5)).all()


def test_int_float_zero_error_bound():
    x = _x((16, 256), seed=9) + 3.0  # all positive: the float zero point still covers the range
    r = quantize(x, QuantArgs(bits=3, group_size=64, zero_point="float", target="key", granularity="per_token"))
    assert ((x - r.x_hat).abs().view(16, 4, 64) <= r.scale[..., None] / 2 * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("args", ALL_FORMATS, ids=IDS)
@pytest.mark.parametrize("kind", ["zero", "constant", "negative_constant", "denormal", "tiny", "single", "huge"])
def test_degenerate_groups_stay_finite(args, kind):
    n = 1 if kind == "single" else 32
    g = torch.Generator().manual_seed(1)
    group = {
        "zero": torch.zeros(n),
        "constant": torch.full((n,), 0.731),
        "negative_constant": torch.full((n,), -2.5),
        "denormal": torch.randn(n, generator=g) * 1e-40,
        "tiny": torch.randn(n, generator=g) * 1e-30,
        "single": torch.tensor([-3.25]),
        "huge": torch.randn(n, generator=g) * 1e37,
    }[kind]
    if args.target == "prob":
        group = group.abs().clamp(max=1.0)
    x = group.repeat(3, 1)
    if args.enabled and args.granularity == "per_group":
        args = args.replace(group_size=n)
    out = fake_quantize(x, args)
    assert torch.isfinite(out).all()
    if kind == "zero":
        assert torch.equal(out, torch.zeros_like(out))
    if kind in ("constant", "negative_constant", "single") and args.dtype == "int":
        torch.testing.assert_close(out, x, rtol=2e-7, atol=0)  # reproduced (exactly for asymmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("args", ALL_FORMATS, ids=IDS)
def test_dtypes_compute_in_fp32_and_return_input_dtype(args, dtype):
    x = _input_for(args, (6, 64), seed=3).to(dtype)
    out = fake_quantize(x, args)
    assert out.dtype == dtype and out.shape == x.shape
    ref = fake_quantize(x.float(), args).to(dtype)
    assert torch.equal(out, ref)


def test_shorter_last_group_576_by_128():
    x = _x((4, 576), seed=5)
    args = QuantArgs(bits=4, group_size=128)
    r = quantize(x, args)
    assert r.scale.shape == (4, 5) and r.group_size == 128
    for k, (a, b) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        part = quantize(x[:, a:b].contiguous(), args.replace(group_size=b - a))
        assert torch.equal(r.x_hat[:, a:b], part.x_hat)
        assert torch.equal(r.scale[:, k], part.scale[:, 0])


def test_shorter_last_group_bitmod_ignores_nothing_and_pads_nothing():
    # the 64-wide last group is chosen on its own 64 elements only
    x = _x((4, 576), seed=6)
    r = quantize(x, QuantArgs(bits=3, dtype="bitmod", group_size=128))
    tail = quantize(x[:, 512:].contiguous(), QuantArgs(bits=3, dtype="bitmod", group_size=64))
    assert torch.equal(r.grid[:, 4], tail.grid[:, 0])
    assert torch.equal(r.x_hat[:, 512:], tail.x_hat)


def test_group_larger_than_row_is_one_group():
    x = _x((3, 40))
    a = quantize(x, QuantArgs(bits=4, group_size=128))
    b = quantize(x, QuantArgs(bits=4))
    assert torch.equal(a.x_hat, b.x_hat) and a.scale.shape == (3, 1)


def test_per_channel_weight_equals_one_group_per_row():
    x = _x((8, 96))
    a = quantize(x, QuantArgs(bits=4))
    b = quantize(x, QuantArgs(bits=4, group_size=96))
    assert torch.equal(a.x_hat, b.x_hat) and a.scale.shape == (8, 1)


def test_per_tensor_single_scale():
    x = _x((8, 96))
    r = quantize(x, QuantArgs(bits=8, symmetric=True, granularity="per_tensor"))
    assert r.scale.shape == (1, 1)
    assert torch.equal(r.scale[0, 0], x.abs().max() / 127)


def test_per_token_activation_any_leading_shape():
    x = _x((2, 5, 64))
    args = QuantArgs(bits=8, dtype="fp8_e4m3", target="activation")
    r = quantize(x, args)
    assert r.x_hat.shape == x.shape and r.scale.shape == (10, 1)
    assert torch.equal(r.x_hat, fake_quantize(x.view(10, 64), args).view(2, 5, 64))


def test_per_token_group_size_splits_tokens():
    x = _x((2, 6, 128))  # KTVT: groups of head_dim=32 over the flattened heads
    args = QuantArgs(bits=4, target="key", group_size=32)
    r = quantize(x, args)
    assert r.scale.shape == (12, 4)
    ref = fake_quantize(x.view(2, 6, 4, 32), QuantArgs(bits=4, target="key", granularity="per_head"))
    assert torch.equal(r.x_hat, ref.view(2, 6, 128))


def test_per_channel_key_groups_tokens():
    # KIVI / KCVT keys: one scale per channel, groups of tokens along dim -2
    k = _x((2, 3, 16, 8))  # [batch, heads, tokens, head_dim]
    args = QuantArgs(bits=2, target="key", granularity="per_channel", group_size=4, zero_point="float")
    r = quantize(k, args)
    assert r.x_hat.shape == k.shape and r.scale.shape == (2 * 3 * 8, 4)
    ref = fake_quantize(
        k.transpose(-1, -2).contiguous(), QuantArgs(bits=2, target="key", group_size=4, zero_point="float")
    ).transpose(-1, -2)
    assert torch.equal(r.x_hat, ref)
    # each (channel, token-group) block has at most 4 levels
    blocks = r.x_hat[0, 0, :4, 0]
    assert len(set(blocks.tolist())) <= 4


def test_per_channel_activation_needs_two_dims():
    with pytest.raises(ValueError, match="per_channel"):
        fake_quantize(torch.randn(16), QuantArgs(bits=4, target="activation", granularity="per_channel"))


def test_non_contiguous_input_and_input_untouched():
    base = _x((64, 48))
    x = base.t()  # [48, 64] non-contiguous
    keep = x.clone()
    args = QuantArgs(bits=4, group_size=16)
    out = fake_quantize(x, args)
    assert torch.equal(x, keep)
    assert torch.equal(out, fake_quantize(x.contiguous(), args))


def test_chunking_matches_single_pass(monkeypatch):
    import wkvaq_quant.quantize as qmod

    x = _x((37, 200), seed=11)
    for args in ALL_FORMATS:
        xi = torch.softmax(x, -1) if args.target == "prob" else x
        ref = quantize(xi, args)
        monkeypatch.setattr(qmod, "CHUNK_ELEMS", 3 * 200)  # 3 rows per chunk, 13 chunks
        got = quantize(xi, args)
        monkeypatch.undo()
        assert torch.equal(got.x_hat, ref.x_hat)
        for name in ("scale", "zero", "grid", "scale2", "scale_code"):
            a, b = getattr(got, name), getattr(ref, name)
            assert (a is None and b is None) or torch.equal(a, b), name


def test_metadata_shapes_and_dtypes():
    x = _x((8, 320))
    r = quantize(x, QuantArgs(bits=4, dtype="bitmod", group_size=128))
    assert r.grid.dtype == torch.int8 and r.grid.shape == (8, 3) and r.scale.shape == (8, 3)
    assert set(r.grid.unique().tolist()) <= {0, 1, 2, 3} and r.zero is None
    ri = quantize(x, QuantArgs(bits=4, group_size=128))
    assert ri.zero.shape == (8, 3) and ri.grid is None and ri.scale2 is None


def test_empty_and_integer_inputs():
    e = torch.empty(0, 64)
    assert fake_quantize(e, QuantArgs(bits=4, group_size=32)).shape == (0, 64)
    with pytest.raises(TypeError):
        fake_quantize(torch.arange(10), QuantArgs(bits=4))


def test_no_grad_tracking():
    x = _x().requires_grad_()
    out = fake_quantize(x, QuantArgs(bits=4, group_size=32))
    assert not out.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("args", ALL_FORMATS, ids=IDS)
def test_cuda_matches_cpu(args):
    x = _input_for(args, (16, 256), seed=4)
    cpu = quantize(x, args)
    gpu = quantize(x.cuda(), args)
    assert gpu.x_hat.is_cuda
    torch.testing.assert_close(gpu.x_hat.cpu(), cpu.x_hat, rtol=1e-6, atol=1e-7)
    if cpu.grid is not None:
        assert (gpu.grid.cpu() == cpu.grid).float().mean() > 0.99
