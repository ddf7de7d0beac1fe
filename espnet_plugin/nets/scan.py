"""Linear recurrences h_t = a_t * h_{t-1} + b_t without a Python loop per time step, and
Mamba's selective scan built on them.

A state-space layer spends its time in this recurrence. Stepping it frame by frame issues a few
tiny tensor operations per frame, so on long utterances the per-operation overhead dominates.
Here time is cut into about sqrt(T) chunks of about sqrt(T) frames and all chunks advance in
lock-step: a scan of T frames costs about 5 sqrt(T) tensor operations, each over many frames at
once, and reads the inputs only twice. Only products and sums of the inputs appear (no division,
no logarithm), so a_t == 0 and thousands of steps are as exact as the sequential loop.
Both backward passes are themselves reverse scans, so autograd stores no intermediate tensors.
When one frame alone holds many states (a training batch), a plain frame-by-frame loop is
faster still: each operation is then large enough, and the inputs are read once, in order.
On CPUs ``selective_scan`` runs the fused C++ kernel of :mod:`espnet_plugin.nets.cpu_kernels`
where it could be built; the PyTorch scan here is its fallback and its reference.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from espnet_plugin.nets import cpu_kernels


# From this many states per frame on, _scan steps frame by frame: each step's operations are big
# enough that their fixed cost no longer matters, while the chunked scan's second read and strided
# access would cost more. A training batch (8 utterances x 288 channels x 16 states) is past it;
# one long utterance at inference (4608 states a frame) stays with the chunked scan.
SEQUENTIAL_MIN_STATES = 2**14


def _scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 from h = 0 (reverse: h_t = a_t h_{t+1} + b_t).

    ``a`` and ``b`` are contiguous tensors of equal shape (B, T, ...); no autograd.
    """
    h = torch.empty_like(b)
    length = a.shape[1]
    if length == 0:
        return h
    if b[:, 0].numel() >= SEQUENTIAL_MIN_STATES:
        steps = range(length - 1, -1, -1) if reverse else range(length)
        state = torch.zeros_like(b[:, 0])
        for t in steps:
            state = torch.addcmul(b[:, t], a[:, t], state, out=h[:, t])
        return h
    size = math.isqrt(length)  # frames per chunk
    chunks = length // size
    left = length - chunks * size  # frames after the last chunk (before the first one if reverse)
    body = slice(left, length) if reverse else slice(0, chunks * size)
    shape = (a.shape[0], chunks, size, *a.shape[2:])
    a_c, b_c, h_c = (x[:, body].view(shape) for x in (a, b, h))
    steps = range(size - 1, -1, -1) if reverse else range(size)

    # 1. Every chunk from a zero state: the state it ends in and the product of its a's.
    # Products that become subnormal are flushed to zero: arithmetic on subnormals is many
    # times slower on CPUs, and a subnormal decay cannot move a state of ordinary size.
    end = torch.zeros_like(b_c[:, :, 0])
    for k in steps:
        end = torch.addcmul(b_c[:, :, k], a_c[:, :, k], end)
    decay = F.threshold_(a_c.prod(dim=2), torch.finfo(a.dtype).tiny, 0.0)
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
    @once_differentiable
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


# Frames are scanned in blocks of about this many (batch x frame x d x n) states: the memory
# in flight stays bounded for any length and small enough to be reused from the allocator.
# On a CPU a block's tensors (1 MiB each in float32) stay in a core's L2 cache between the
# steps of the scan: up to 1.5x faster on one core than blocks of 2**20 (benchmark_scan).
BLOCK_STATES = 2**18
GPU_BLOCK_STATES = 2**20


class _TimeMajor(NamedTuple):
    """selective_scan's inputs as the scan uses them: (b, l, channels), at least float32."""

    u: torch.Tensor
    dt: torch.Tensor  # step sizes: delta + delta_bias, through softplus if asked
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: Optional[torch.Tensor]

    @classmethod
    def of(cls, u, delta, A, B, C, D, delta_bias, delta_softplus):
        dtype = torch.promote_types(u.dtype, torch.float32)  # mamba_ssm scans in float32 too
        dt = delta.to(dtype) if delta_bias is None else delta.to(dtype) + delta_bias[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        u, dt, B, C = (x.to(dtype).transpose(1, 2).contiguous() for x in (u, dt, B, C))
        return cls(u, dt, A.to(dtype), B, C, None if D is None else D.to(dtype))

    def blocks(self) -> list[slice]:
        batch, length, d_inner = self.u.shape
        states = BLOCK_STATES if self.u.device.type == "cpu" else GPU_BLOCK_STATES
        size = max(1, states // (batch * d_inner * self.A.shape[1]))
        return [slice(s, min(s + size, length)) for s in range(0, length, size)]

    def states(self, block: slice, start: torch.Tensor):
        """Decays exp(dt A) and states h (b, l, d, n) of a block of frames entered in ``start``."""
        dt = self.dt[:, block]
        decay = (dt[..., None] * self.A).exp_()
        drive = (dt * self.u[:, block])[..., None] * self.B[:, block, None]
        drive[:, 0].addcmul_(decay[:, 0], start)
        return decay, _scan(decay, drive)


class _SelectiveScan(torch.autograd.Function):
    """Saves the inputs, the ungated output and the state at each block start, not the states.

    Backward recomputes one block of states at a time, last block first, as mamba_ssm does.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        x = _TimeMajor.of(u, delta, A, B, C, D, delta_bias, delta_softplus)
        blocks = x.blocks()
        y = torch.empty_like(x.u)
        starts = x.u.new_zeros(len(blocks), u.shape[0], *A.shape)
        for j, block in enumerate(blocks):
            if j > 0:
                starts[j] = h[:, -1]
            _, h = x.states(block, starts[j])
            torch.matmul(h, x.C[:, block, :, None], out=y[:, block, :, None])
        if D is not None:
            y.addcmul_(x.u, x.D)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, starts)
        y = y.transpose(1, 2)
        return (y if z is None else y * F.silu(z.to(y.dtype))).to(u.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        *inputs, y, starts = ctx.saved_tensors
        u, delta, A, B, C, D, z, delta_bias = inputs
        x = _TimeMajor.of(u, delta, A, B, C, D, delta_bias, ctx.delta_softplus)
        grad_y, grad_z = grad_out.to(y.dtype).transpose(1, 2), None
        if z is not None:  # out = y * silu(z)
            z = z.to(y.dtype).transpose(1, 2)
            gate = torch.sigmoid(z)
            grad_z = grad_y * y * gate * (1 + z * (1 - gate))
            grad_y = grad_y * z * gate
        grad_u, grad_dt = torch.empty_like(x.u), torch.empty_like(x.dt)
        grad_B, grad_C = torch.empty_like(x.B), torch.empty_like(x.C)
        grad_A = torch.zeros_like(x.A)
        carry = torch.zeros_like(starts[0])  # gradient w.r.t. the state a block ends in
        for j, block in reversed(list(enumerate(x.blocks()))):
            dt, u_, B_ = x.dt[:, block], x.u[:, block], x.B[:, block]
            decay, h = x.states(block, starts[j])
            torch.matmul(grad_y[:, block, None], h, out=grad_C[:, block, None])
            # Gradient w.r.t. each step's drive dt u B: the output gradient, run back in time.
            grad_drive = grad_y[:, block, :, None] * x.C[:, block, None]
            grad_drive[:, -1] += carry
            grad_drive = _adjoint_scan(decay, grad_drive)
            carry = decay[:, 0] * grad_drive[:, 0]
            # Gradient w.r.t. each log decay dt A: grad_drive_t decay_t h_{t-1}, in decay's place.
            grad_log_decay = decay
            grad_log_decay[:, 1:].mul_(grad_drive[:, 1:]).mul_(h[:, :-1])
            grad_log_decay[:, 0] = carry * starts[j]
            del h
            grad_A += (grad_log_decay * dt[..., None]).sum((0, 1))
            grad_drive_B = (grad_drive @ B_[..., None]).squeeze(-1)  # (b, l, d)
            grad_dt[:, block] = grad_log_decay.mul_(x.A).sum(-1) + grad_drive_B * u_
            torch.matmul((dt * u_)[:, :, None], grad_drive, out=grad_B[:, block, None])
            grad_u[:, block] = grad_drive_B * dt
        grad_D = None
        if D is not None:
            grad_u.addcmul_(grad_y, x.D)
            grad_D = (grad_y * x.u).sum((0, 1))
        if ctx.delta_softplus:  # softplus'(v) = sigmoid(v) = 1 - exp(-softplus(v))
            grad_dt *= -torch.expm1(-x.dt)
        grad_delta_bias = None if delta_bias is None else grad_dt.sum((0, 1))
        grad_z = None if grad_z is None else grad_z.transpose(1, 2)
        grads = (
            grad_u.transpose(1, 2),
            grad_dt.transpose(1, 2),
            grad_A,
            grad_B.transpose(1, 2),
            grad_C.transpose(1, 2),
            grad_D,
            grad_z,
            grad_delta_bias,
        )
        return (*(None if g is None else g.to(v.dtype) for g, v in zip(grads, inputs)), None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's ``selective_scan_fn`` (real A, input-dependent B and C) for non-CUDA tensors.

    On CPU tensors the fused C++ kernel of :mod:`espnet_plugin.nets.cpu_kernels` runs where it
    could be built, :func:`pytorch_selective_scan` everywhere else.

    Args:
        u, delta: (b, d, l) inputs and raw step sizes.
        A: (d, n) state matrix (negative for a decaying state).
        B, C: (b, n, l) input and output projections of the state.
        D: (d,) skip connection; z: (b, d, l) gate, the output is y * silu(z).
        delta_bias: (d,) added to delta, then softplus when ``delta_softplus``.

    Returns:
        y: (b, d, l) in u's dtype, computed in at least float32.
    """
    _check_layout(A, B, C)
    if u.device.type == "cpu" and cpu_kernels.extension() is not None:
        return cpu_kernels.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def pytorch_selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
    """:func:`selective_scan` in PyTorch alone, on any device: the fallback and the reference."""
    _check_layout(A, B, C)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _check_layout(A, B, C) -> None:
    if A.is_complex() or A.dim() != 2 or B.dim() != 3 or C.dim() != 3:
        raise ValueError(
            "selective_scan supports a real A (d, n) and input-dependent B, C (b, n, l) only, got "
            f"A {tuple(A.shape)} {A.dtype}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
