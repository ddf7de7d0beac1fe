"""selective_scan against the per-step float64 definition of mamba_ssm's selective_scan_ref."""

import pytest
import torch
import torch.nn.functional as F

from espnet_plugin.nets import scan
from espnet_plugin.nets.scan import selective_scan


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,  y_t = C_t x_t + D u_t,  out = y * silu(z)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    x = u.new_zeros(u.shape[0], *A.shape)  # (b, d, n)
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]  # (b, d, 1)
        x = torch.exp(dt * A) * x + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((x * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + D[:, None] * u
    return y if z is None else y * F.silu(z)


NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, n, length, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "u": randn(b, d, length),
        "delta": randn(b, d, length) - 1.0,
        "A": -torch.rand(d, n, generator=g, dtype=torch.float64).to(dtype) * 4 - 0.1,
        "B": randn(b, n, length),
        "C": randn(b, n, length),
        "D": randn(d),
        "z": randn(b, d, length),
        "delta_bias": randn(d) * 0.5,
    }


def outputs_and_grads(fn, inputs, weight, **options):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves, **options)
    (out * weight).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


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
    out, grads = outputs_and_grads(selective_scan, inputs, weight, **kwargs)
    ref_out, ref_grads = outputs_and_grads(reference, inputs, weight, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name in inputs:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_gradcheck(block_states, scan_path):
    inputs = make_inputs(3, 6, 4, 12, seed=1)
    leaves = [inputs[k].requires_grad_() for k in NAMES]

    def fn(*args):
        return selective_scan(*args, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_float32_long_sequence_matches_float64_reference():
    """Mamba-like magnitudes (dt ~ 0.001-0.1, A = -(1..n)) over 2003 frames, in float32."""
    inputs = make_inputs(2, 8, 4, 2003, seed=2)
    inputs["A"] = -torch.arange(1, 5, dtype=torch.float64).repeat(8, 1)
    dt_bias = torch.linspace(0.001, 0.1, 8, dtype=torch.float64)
    inputs["delta_bias"] = torch.log(torch.expm1(dt_bias))  # softplus(delta_bias) = dt_bias
    inputs["delta"] = inputs["delta"] * 0.1
    weight = torch.randn(2, 8, 2003, dtype=torch.float64)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    out, grads = outputs_and_grads(selective_scan, inputs32, weight.float(), delta_softplus=True)
    ref_out, ref_grads = outputs_and_grads(reference, inputs, weight, delta_softplus=True)
    assert out.dtype == torch.float32
    assert relative_error(out, ref_out) < 1e-5
    for name in NAMES:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


def test_low_precision_inputs_are_scanned_in_float32():
    inputs = make_inputs(2, 4, 3, 30, seed=3)
    half = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    out = selective_scan(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    # Same bf16-rounded inputs, evaluated in float64: only the final rounding may differ.
    ref = reference(**{k: v.double() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_states_are_not_kept_for_backward(block_states):
    """Only (b, l, d)-sized tensors and per-block start states are saved, never (b, l, d, n)."""
    b, d, n, length = 2, 6, 4, 40
    inputs = {k: v.requires_grad_() for k, v in make_inputs(b, d, n, length).items()}
    out = selective_scan(**inputs, delta_softplus=True)
    saved = out.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) < b * length * d * n


def test_unsupported_layouts_are_rejected():
    x = make_inputs(2, 4, 3, 5)
    grouped_B = x["B"][:, None]  # mamba_ssm's (b, groups, n, l) variant
    with pytest.raises(ValueError, match=r"B \(2, 1, 3, 5\)"):
        selective_scan(x["u"], x["delta"], x["A"], grouped_B, x["C"])
