"""Linear recurrences h_t = a_t * h_{t-1} + b_t without a Python loop per time step.

A state-space layer spends its time in this recurrence. Stepping it frame by frame issues a few
tiny tensor operations per frame, so on long utterances the per-operation overhead dominates.
Here time is cut into about sqrt(T) chunks of about sqrt(T) frames and all chunks advance in
lock-step: a scan of T frames costs about 5 sqrt(T) tensor operations, each over many frames at
once, and reads the inputs only twice. Only products and sums of the inputs appear (no division,
no logarithm), so a_t == 0 and thousands of steps are as exact as the sequential loop.
"""

import math

import torch


def _scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 from h = 0 (reverse: h_t = a_t h_{t+1} + b_t).

    ``a`` and ``b`` are contiguous tensors of equal shape (B, T, ...); no autograd.
    """
    h = torch.empty_like(b)
    length = a.shape[1]
    if length == 0:
        return h
    size = math.isqrt(length)  # frames per chunk
    chunks = length // size
    left = length - chunks * size  # frames after the last chunk (before the first one if reverse)
    body = slice(left, length) if reverse else slice(0, chunks * size)
    shape = (a.shape[0], chunks, size, *a.shape[2:])
    a_c, b_c, h_c = (x[:, body].view(shape) for x in (a, b, h))
    steps = range(size - 1, -1, -1) if reverse else range(size)

    # 1. Every chunk from a zero state: the state it ends in and the product of its a's.
    end, decay = torch.zeros_like(b_c[:, :, 0]), torch.ones_like(a_c[:, :, 0])
    for k in steps:
        end = torch.addcmul(b_c[:, :, k], a_c[:, :, k], end)
        decay.mul_(a_c[:, :, k])
    # 2. The state entering each chunk, chained from chunk to chunk (the only sequential part).
    start = torch.zeros_like(end)
    for j in range(chunks - 2, -1, -1) if reverse else range(1, chunks):
        i = j + 1 if reverse else j - 1
        torch.addcmul(end[:, i], decay[:, i], start[:, i], out=start[:, j])
    # 3. Every chunk again from its true entering state, writing h.
    state = start
    for k in steps:
        state = torch.addcmul(b_c[:, :, k], a_c[:, :, k], state, out=h_c[:, :, k])
    # 4. The frames that did not fill a chunk.
    state = h[:, left] if reverse else h[:, chunks * size - 1]
    for t in range(left - 1, -1, -1) if reverse else range(chunks * size, length):
        state = torch.addcmul(b[:, t], a[:, t], state, out=h[:, t])
    return h


def _adjoint_scan(a: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """Gradient of ``_scan(a, b)`` w.r.t. b: g_t = grad_h_t + a_{t+1} g_{t+1}, a reverse scan."""
    a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
    return _scan(a_next, grad_h.contiguous(), reverse=True)


class _LinearRecurrence(torch.autograd.Function):
    """Keeps only a and h for backward; the backward pass is one reverse scan."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        a, h = ctx.saved_tensors
        grad_b = _adjoint_scan(a, grad_h)
        grad_a = None
        if ctx.needs_input_grad[0]:  # dh_t/da_t = h_{t-1}, and h_{-1} = 0
            grad_a = torch.zeros_like(h)
            torch.mul(grad_b[:, 1:], h[:, :-1], out=grad_a[:, 1:])
        return grad_a, grad_b


def linear_recurrence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1 (time) with h_{-1} = 0.

    Args:
        a: (B, T, ...) decay factors, expected in [0, 1].
        b: (B, T, ...) inputs, same shape as ``a``.

    Returns:
        h: (B, T, ...) in the promoted dtype of ``a`` and ``b``.
    """
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(
            "linear_recurrence expects a and b of equal shape (B, T, ...), "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    return _LinearRecurrence.apply(a.to(dtype).contiguous(), b.to(dtype).contiguous())
