"""linear_recurrence against a plain sequential float64 loop: values, gradients, edge cases."""

import pytest
import torch

from espnet_plugin.nets.scan import linear_recurrence


def sequential_recurrence(a, b):
    """The definition, one frame at a time."""
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def random_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Mostly close to 1, so the state remembers hundreds of frames.
    a = torch.rand(shape, generator=g, dtype=torch.float64) ** 0.05
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


# 1, 2 and primes: never a multiple of a chunk length; 2000 and 3001 for long sequences.
@pytest.mark.parametrize("length", [1, 2, 3, 7, 31, 97, 2000, 3001])
def test_forward_matches_sequential_float64(length, scan_path):
    a, b = random_inputs((2, length, 3), torch.float64)
    torch.testing.assert_close(
        linear_recurrence(a, b), sequential_recurrence(a, b), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("length", [5, 53, 2000])
def test_gradients_match_sequential_float64(length, scan_path):
    a, b = random_inputs((2, length, 2, 3), torch.float64, seed=1)
    weight = torch.randn(a.shape, dtype=torch.float64)  # a non-uniform upstream gradient
    grads = []
    for fn in (linear_recurrence, sequential_recurrence):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        (fn(a_, b_) * weight).sum().backward()
        grads.append((a_.grad, b_.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    a, b = random_inputs((1, 11, 2), torch.float64, seed=2)
    assert torch.autograd.gradcheck(linear_recurrence, (a.requires_grad_(), b.requires_grad_()))


def test_float32_long_sequence_relative_error(scan_path):
    a, b = random_inputs((2, 3001, 8), torch.float32, seed=3)
    ref = sequential_recurrence(a.double(), b.double())
    assert relative_error(linear_recurrence(a, b), ref) < 1e-5

    weight = torch.randn(a.shape)
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    (linear_recurrence(a32, b32) * weight).sum().backward()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    (sequential_recurrence(a64, b64) * weight.double()).sum().backward()
    assert relative_error(a32.grad, a64.grad) < 1e-5
    assert relative_error(b32.grad, b64.grad) < 1e-5


def test_zero_decay_resets_state(scan_path):
    """a_t == 0 forgets everything before t: h_t == b_t exactly, and no NaN/inf anywhere."""
    a, b = random_inputs((1, 50, 4), torch.float32, seed=4)
    a[:, 20] = 0
    a[:, 35:] = 0
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    h = linear_recurrence(a_, b_)
    h.sum().backward()
    assert torch.equal(h[:, 20], b[:, 20])
    assert torch.equal(h[:, 35:], b[:, 35:])
    # The state before frame 20 cannot influence anything from frame 20 on.
    b2 = b.clone()
    b2[:, :20] += 100.0
    torch.testing.assert_close(linear_recurrence(a, b2)[:, 20:], h[:, 20:].detach(), rtol=0, atol=0)
    assert torch.isfinite(a_.grad).all() and torch.isfinite(b_.grad).all()


def test_output_does_not_depend_on_later_frames():
    a, b = random_inputs((1, 40, 2), torch.float64, seed=5)
    b2 = b.clone()
    b2[:, 25] += 1.0
    h, h2 = linear_recurrence(a, b), linear_recurrence(a, b2)
    assert torch.equal(h[:, :25], h2[:, :25])
    assert not torch.equal(h[:, 25:], h2[:, 25:])


def test_non_contiguous_inputs():
    a, b = random_inputs((3, 2, 29), torch.float64, seed=6)
    a_t, b_t = a.transpose(1, 2), b.transpose(1, 2)  # time is dim 1 of a transposed view
    torch.testing.assert_close(linear_recurrence(a_t, b_t), sequential_recurrence(a_t, b_t))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="equal shape"):
        linear_recurrence(torch.ones(2, 5, 3), torch.ones(2, 5, 4))
