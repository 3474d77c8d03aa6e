"""QuantArgs: defaults are resolved, invalid combinations raise naming the field and the allowed values."""

import dataclasses

import pytest

from wkvaq_quant.config import QuantArgs
from wkvaq_quant.formats import available_formats


def test_registry_lists_every_format():
    assert set(available_formats()) >= {"int", "fp8_e4m3", "fp4_e2m1", "bitmod", "ufloat"}


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(bits=0), "bits", "1..16"),
        (dict(bits=17), "bits", "1..16"),
        (dict(bits=-4), "bits", "1..16"),
        (dict(bits=4.0), "bits", "an integer"),
        (dict(bits=True), "bits", "an integer"),
        (dict(bits=4, dtype="nf4"), "dtype", "'bitmod', 'fp4_e2m1', 'fp8_e4m3', 'int', 'ufloat'"),
        (dict(bits=4, group_size=0), "group_size", "-1 (whole row) or a positive integer"),
        (dict(bits=4, group_size=-2), "group_size", "-1 (whole row) or a positive integer"),
        (dict(bits=4, granularity="per_token"), "granularity", "'per_tensor', 'per_channel', 'per_group'"),
        (dict(bits=4, granularity="per_head"), "granularity", "'per_tensor', 'per_channel', 'per_group'"),
        (dict(bits=4, granularity="per_row"), "granularity", "'per_tensor', 'per_channel', 'per_token'"),
        (dict(bits=8, target="activation", granularity="per_group", group_size=128), "granularity",
         "'per_tensor', 'per_token', 'per_channel'"),
        (dict(bits=8, target="prob", granularity="per_channel"), "granularity", "'per_tensor', 'per_token'"),
        (dict(bits=4, target="bias"), "target", "'weight', 'activation', 'query', 'key', 'value', 'prob'"),
        (dict(bits=4, granularity="per_group"), "group_size", "a positive integer"),
        (dict(bits=4, granularity="per_tensor", group_size=128), "group_size", "-1"),
        (dict(bits=4, granularity="per_channel", group_size=128), "group_size", "-1"),
        (dict(bits=4, dtype="fp8_e4m3"), "bits", "8, or >= 16 (off)"),
        (dict(bits=8, dtype="fp4_e2m1"), "bits", "4, or >= 16 (off)"),
        (dict(bits=2, dtype="bitmod"), "bits", "3, 4, or >= 16 (off)"),
        (dict(bits=4, dtype="ufloat", target="prob"), "bits", "8, 12, or >= 16 (off)"),
        (dict(bits=8, dtype="fp8_e4m3", symmetric=False), "symmetric", "True"),
        (dict(bits=4, symmetric="yes"), "symmetric", "True, False, None"),
        (dict(bits=1, symmetric=True), "bits", "2..15 when symmetric=True"),
        (dict(bits=4, symmetric=True, zero_point="float"), "zero_point", "'none'"),
        (dict(bits=4, symmetric=True, zero_point="int"), "zero_point", "'none'"),
        (dict(bits=4, zero_point="none"), "zero_point", "'int', 'float'"),
        (dict(bits=4, zero_point="fp16"), "zero_point", "'int', 'float', 'none'"),
        (dict(bits=8, dtype="fp8_e4m3", zero_point="float"), "zero_point", "'none'"),
        (dict(bits=8, dtype="ufloat", target="prob", granularity="per_token"), "granularity", "'per_tensor'"),
        (dict(bits=8, dtype="ufloat", target="prob", group_size=64), "group_size", "'per_tensor'"),
        (dict(bits=4, double_quant=True), "double_quant", "target='weight', granularity='per_group'"),
        (dict(bits=8, target="activation", double_quant=True), "double_quant", "granularity='per_group'"),
        (dict(bits=4, double_quant=1), "double_quant", "True, False"),
    ],
)
def test_invalid_args_raise_naming_field_and_allowed(kwargs, field, allowed):
    with pytest.raises(ValueError) as exc:
        QuantArgs(**kwargs)
    msg = str(exc.value)
    assert f"QuantArgs.{field}=" in msg
    assert "allowed:" in msg and allowed in msg


def test_defaults_resolve_per_target_and_format():
    w = QuantArgs(bits=4, group_size=128)
    assert (w.granularity, w.symmetric, w.zero_point) == ("per_group", False, "int")
    assert QuantArgs(bits=4).granularity == "per_channel"
    a = QuantArgs(bits=8, dtype="fp8_e4m3", target="activation")
    assert (a.granularity, a.symmetric, a.zero_point) == ("per_token", True, "none")
    p = QuantArgs(bits=8, dtype="ufloat", target="prob")
    assert p.granularity == "per_tensor"
    assert QuantArgs(bits=4, symmetric=True).zero_point == "none"
    # the resolved spelling equals the short one
    assert QuantArgs(bits=4, group_size=128) == QuantArgs(
        bits=4, group_size=128, symmetric=False, zero_point="int", granularity="per_group"
    )


def test_bits_16_and_above_is_off_for_any_format():
    for dtype in available_formats():
        target = "prob" if dtype == "ufloat" else "weight"
        args = QuantArgs(bits=16, dtype=dtype, target=target)
        assert not args.enabled
    assert not QuantArgs(bits=16).enabled
    assert QuantArgs(bits=15).enabled


def test_valid_combinations_construct():
    QuantArgs(bits=4, target="key", granularity="per_channel", group_size=32)
    QuantArgs(bits=4, target="value", granularity="per_head", group_size=64)
    QuantArgs(bits=8, dtype="fp8_e4m3", target="query", granularity="per_head")
    QuantArgs(bits=2, target="key", zero_point="float")
    QuantArgs(bits=4, dtype="bitmod", group_size=128, double_quant=True)
    QuantArgs(bits=12, dtype="ufloat", target="prob")
    QuantArgs(bits=8, target="prob", symmetric=False)


def test_frozen_and_replace_revalidates():
    args = QuantArgs(bits=4, group_size=128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.bits = 3  # type: ignore[misc]
    fp8 = args.replace(dtype="fp8_e4m3", bits=8)
    assert (fp8.symmetric, fp8.zero_point, fp8.granularity) == (True, "none", "per_group")
    with pytest.raises(ValueError, match="QuantArgs.bits=4"):
        args.replace(dtype="fp8_e4m3")
    assert args.replace(symmetric=True).zero_point == "none"
    assert args.to_dict()["bits"] == 4
