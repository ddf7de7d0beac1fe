"""The per-step float64 definition of mamba_ssm's ``selective_scan_ref`` and inputs for it, shared
by the tests of the PyTorch scan and of the fused CPU kernels."""

import torch
import torch.nn.functional as F

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


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


def mamba_like_inputs(b, d, n, length, seed=0):
    """Magnitudes of a trained Mamba layer: dt ~ 0.001-0.1, A = -(1..n), in float64."""
    inputs = make_inputs(b, d, n, length, seed=seed)
    inputs["A"] = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1)
    dt_bias = torch.linspace(0.001, 0.1, d, dtype=torch.float64)
    inputs["delta_bias"] = torch.log(torch.expm1(dt_bias))  # softplus(delta_bias) = dt_bias
    inputs["delta"] = inputs["delta"] * 0.1
    return inputs


def outputs_and_grads(fn, inputs, weight, **options):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves, **options)
    (out * weight).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()
