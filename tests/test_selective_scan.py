"""The PyTorch selective scan against the per-step float64 definition of mamba_ssm's
selective_scan_ref, and which implementation ``selective_scan`` runs."""

import pytest
import torch
from selective_scan_reference import (
    NAMES,
    make_inputs,
    mamba_like_inputs,
    outputs_and_grads,
    reference,
    relative_error,
)

from espnet_plugin.nets import cpu_kernels, scan
from espnet_plugin.nets.scan import pytorch_selective_scan, selective_scan


@pytest.fixture(params=[2**30, 3 * 6 * 4 * 5], ids=["one_block", "blocks_of_5"])
def block_states(request, monkeypatch):
    """Run each test with the whole sequence in one block and with many blocks of 5 frames."""
    monkeypatch.setattr(scan, "BLOCK_STATES", request.param)


@pytest.mark.parametrize("length", [1, 4, 23])
@pytest.mark.parametrize("options", ["all", "bare"])
def test_matches_reference_float64(block_states, scan_path, length, options):
    inputs = make_inputs(3, 6, 4, length)
    if options == "all":
        kwargs = {"delta_softplus": True}
    else:  # no D, z or bias; delta used as is, so keep it positive
        inputs = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
        inputs["delta"] = inputs["delta"].abs()
        kwargs = {}
    weight = torch.randn(3, 6, length, dtype=torch.float64)
    out, grads = outputs_and_grads(pytorch_selective_scan, inputs, weight, **kwargs)
    ref_out, ref_grads = outputs_and_grads(reference, inputs, weight, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_gradcheck(block_states, scan_path):
    inputs = make_inputs(3, 6, 4, 12, seed=1)
    leaves = [inputs[k].requires_grad_() for k in NAMES]

    def fn(*args):
        return pytorch_selective_scan(*args, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_float32_long_sequence_matches_float64_reference(cpu_path):
    """Mamba-like magnitudes (dt ~ 0.001-0.1, A = -(1..n)) over 2003 frames, in float32."""
    inputs = mamba_like_inputs(2, 8, 4, 2003, seed=2)
    weight = torch.randn(2, 8, 2003, dtype=torch.float64)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    out, grads = outputs_and_grads(selective_scan, inputs32, weight.float(), delta_softplus=True)
    ref_out, ref_grads = outputs_and_grads(reference, inputs, weight, delta_softplus=True)
    assert out.dtype == torch.float32
    assert relative_error(out, ref_out) < 1e-5
    for name in NAMES:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


def test_low_precision_inputs_are_scanned_in_float32(cpu_path):
    inputs = make_inputs(2, 4, 3, 30, seed=3)
    half = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    out = selective_scan(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    # Same bf16-rounded inputs, evaluated in float64: only the final rounding may differ.
    ref = reference(**{k: v.double() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("algorithm", ["pytorch_one_block", "pytorch_blocks_of_5", "cpu_kernels"])
def test_states_are_not_kept_for_backward(algorithm, monkeypatch, request):
    """Only (b, l, d)-sized tensors and states at block or interval starts are saved, never
    (b, l, d, n)."""
    b, d, n, length = 2, 6, 4, 40
    if algorithm == "cpu_kernels":
        request.getfixturevalue("cpu_kernels_extension")
        fn = cpu_kernels.selective_scan
    else:
        monkeypatch.setattr(scan, "BLOCK_STATES", 2**30 if algorithm.endswith("block") else 120)
        fn = pytorch_selective_scan
    inputs = {k: v.requires_grad_() for k, v in make_inputs(b, d, n, length).items()}
    out = fn(**inputs, delta_softplus=True)
    saved = out.grad_fn.saved_tensors
    assert max(t.numel() for t in saved if t is not None) < b * length * d * n


def test_cpu_tensors_take_the_fused_kernels_where_built(cpu_path):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 4, 3, 10).items()}
    out = selective_scan(**inputs, delta_softplus=True)
    expected = "espnet_plugin.nets." + ("scan" if cpu_path == "pytorch" else "cpu_kernels")
    assert out.grad_fn._forward_cls.__module__ == expected


def test_unsupported_layouts_are_rejected():
    x = make_inputs(2, 4, 3, 5)
    grouped_B = x["B"][:, None]  # mamba_ssm's (b, groups, n, l) variant
    with pytest.raises(ValueError, match=r"B \(2, 1, 3, 5\)"):
        selective_scan(x["u"], x["delta"], x["A"], grouped_B, x["C"])
