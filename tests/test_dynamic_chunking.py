"""Dynamic chunking against hand-made frames, hand-computed losses and a float64 per-frame loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from espnet2.torch_utils.initialize import initialize

from espnet_plugin.nets.aux_loss import collect_aux
from espnet_plugin.nets.dynamic_chunking import DynamicChunking, ratio_loss


def plane_frames(degrees: list[float], d_model: int = 4) -> torch.Tensor:
    """(1, T, d_model) unit frames at the given angles in the (e1, e2) plane: p_t is known."""
    frames = torch.zeros(1, len(degrees), d_model)
    radians = torch.tensor(degrees) * math.pi / 180
    frames[0, :, 0], frames[0, :, 1] = radians.cos(), radians.sin()
    return frames


def flip_frames(lengths: list[int], d_model: int, seed: int) -> torch.Tensor:
    """(B, L, d_model) frames +-v + noise whose sign flips at random: p is near 0 or near 1.

    Padding is large noise, to show it is ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, max_len = len(lengths), max(lengths)
    direction = torch.randn(d_model, generator=gen)
    flips = torch.rand(batch, max_len, generator=gen) < 0.35
    sign = 1 - 2 * (flips.long().cumsum(1) % 2)
    x = sign[..., None] * direction + 0.2 * torch.randn(batch, max_len, d_model, generator=gen)
    for i, n in enumerate(lengths):
        x[i, n:] = 10 * torch.randn(max_len - n, d_model, generator=gen)
    return x


def reference_layer(params: dict[str, torch.Tensor], x: torch.Tensor, lengths: list[int]):
    """The layer written frame by frame from the paper's equations, one utterance at a time.

    ``params`` holds float64 router, residual and inner-layer weights; returns the full-rate
    output per utterance, their boundary decisions and boundary probabilities.
    """
    outputs, kept_all, probs = [], [], []
    for i, n in enumerate(lengths):
        frames = x[i, :n].double()
        q, k = frames @ params["q"].T, frames @ params["k"].T
        p = [torch.ones((), dtype=torch.float64)]
        p += [(1 - F.cosine_similarity(q[t], k[t - 1], dim=0)) / 2 for t in range(1, n)]
        kept = [bool(prob >= 0.5) for prob in p]
        inner = F.linear(frames[kept], params["inner_w"], params["inner_b"])
        z, j, out = torch.zeros(frames.size(1), dtype=torch.float64), 0, []
        for t in range(n):
            if kept[t]:
                z = p[t] * inner[j] + (1 - p[t]) * z
                j += 1
            confidence = p[t] if kept[t] else 1 - p[t]
            one_with_gradient = 1 + confidence - confidence.detach()
            residual = F.linear(frames[t], params["res_w"], params["res_b"])
            out.append(z * one_with_gradient + residual)
        outputs.append(torch.stack(out))
        kept_all.append(kept)
        probs.append(torch.stack(p))
    return outputs, kept_all, probs


def random_layer(d_model: int, seed: int) -> tuple[DynamicChunking, torch.nn.Linear]:
    """A chunking layer with a perturbed router and a non-zero residual, and an inner layer."""
    torch.manual_seed(seed)
    layer = DynamicChunking(d_model)
    inner = torch.nn.Linear(d_model, d_model)
    with torch.no_grad():
        layer.q_proj.weight.add_(0.1 * torch.randn(d_model, d_model))
        layer.k_proj.weight.add_(0.1 * torch.randn(d_model, d_model))
        layer.residual_proj.weight.normal_(0, 0.3)
        layer.residual_proj.bias.normal_(0, 0.3)
    return layer, inner


def run_layer(layer, inner, x, lengths, min_lengths=None):
    x_chunked, chunk_lengths, state = layer.chunk(x, lengths, min_lengths)
    return layer.dechunk(inner(x_chunked), state), x_chunked, chunk_lengths, state


# --- routing -------------------------------------------------------------------------------


def test_routing_identical_orthogonal_opposite():
    # Frame pairs: identical (p=0), orthogonal (p=1/2), opposite (p=1), same direction (p=0).
    e1, e2 = torch.eye(4)[:2]
    x = torch.stack([e1, e1, e2, -e2, -2 * e2])[None]
    prob, boundary = DynamicChunking(4).route(x, torch.tensor([5]))
    torch.testing.assert_close(prob, torch.tensor([[1.0, 0.0, 0.5, 1.0, 0.0]]))
    assert boundary.tolist() == [[True, False, True, True, False]]


def test_first_frame_of_every_utterance_is_a_boundary():
    x = torch.ones(3, 4, 4)  # identical frames: no other boundary
    prob, boundary = DynamicChunking(4).route(x, torch.tensor([4, 2, 1]))
    assert boundary.tolist() == [[True, False, False, False], [True, False, False, False]] + [
        [True, False, False, False]
    ]
    assert prob[:, 0].tolist() == [1.0, 1.0, 1.0]


def test_chunk_keeps_the_boundary_frames_in_order():
    e1, e2 = torch.eye(4)[:2]
    x = torch.stack([e1, e1, e2, -e2, -2 * e2])[None]
    x_chunked, chunk_lengths, state = DynamicChunking(4).chunk(x, torch.tensor([5]))
    assert chunk_lengths.tolist() == [3]
    assert torch.equal(x_chunked[0], torch.stack([e1, e2, -e2]))
    assert state.compression_ratio.item() == pytest.approx(3 / 5)


# --- ratio loss ----------------------------------------------------------------------------


def test_ratio_loss_hand_computed():
    # p = [1, 0, 1/2, 1, 0]: F = 3/5 boundaries, G = 2.5/5 mean probability; N = 4.
    e1, e2 = torch.eye(4)[:2]
    x = torch.stack([e1, e1, e2, -e2, -2 * e2])[None]
    layer = DynamicChunking(4, target_ratio=0.25)
    _, _, state = layer.chunk(x, torch.tensor([5]))
    expected = 4 / 3 * (3 * 0.6 * 0.5 + 0.4 * 0.5)
    assert layer.ratio_loss(state).item() == pytest.approx(expected)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ratio_loss_is_one_at_its_minimum_on_target(n):
    frames = 12
    valid = torch.ones(1, frames, dtype=torch.bool)
    losses = {}
    for k in range(1, frames):  # F = G = k / frames
        boundary = (torch.arange(frames) < k)[None]
        prob = torch.full((1, frames), k / frames)
        losses[k] = ratio_loss(boundary, prob, valid, 1 / n).item()
    best = min(losses, key=losses.get)
    assert best == frames // n
    assert losses[best] == pytest.approx(1.0)


def test_ratio_loss_ignores_padding():
    boundary = torch.tensor([[True, False, True, True]])
    prob = torch.tensor([[1.0, 0.2, 0.7, 0.9]])
    valid = torch.tensor([[True, True, True, False]])
    loss = ratio_loss(boundary, prob, valid, 0.5).item()
    f, g = 2 / 3, 1.9 / 3
    assert loss == pytest.approx(2 * (f * g + (1 - f) * (1 - g)))


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["main", "ratio"])
def test_gradients_reach_the_router(objective):
    layer, inner = random_layer(6, seed=0)
    x = flip_frames([9, 6], 6, seed=1)
    out, _, _, state = run_layer(layer, inner, x, torch.tensor([9, 6]))
    loss = out.pow(2).sum() if objective == "main" else layer.ratio_loss(state)
    loss.backward()
    for proj in (layer.q_proj, layer.k_proj):
        assert torch.isfinite(proj.weight.grad).all()
        assert proj.weight.grad.abs().sum() > 0


def test_layer_and_gradients_match_float64_reference():
    """Forward values (EMA, upsampling, residual) and gradients (STE confidence included)."""
    lengths = [11, 7, 1]
    layer, inner = random_layer(5, seed=2)
    x = flip_frames(lengths, 5, seed=3).requires_grad_()
    out, _, _, state = run_layer(layer, inner, x, torch.tensor(lengths))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * weights).sum().backward()

    params = {
        "q": layer.q_proj.weight,
        "k": layer.k_proj.weight,
        "res_w": layer.residual_proj.weight,
        "res_b": layer.residual_proj.bias,
        "inner_w": inner.weight,
        "inner_b": inner.bias,
    }
    params = {name: p.detach().double().requires_grad_() for name, p in params.items()}
    x_ref = x.detach().double().requires_grad_()
    ref_out, ref_kept, ref_prob = reference_layer(params, x_ref, lengths)
    sum((o * weights[i, : len(o)].double()).sum() for i, o in enumerate(ref_out)).backward()

    float32 = {"rtol": 1e-4, "atol": 1e-5}  # the layer runs in float32, the reference float64
    for i, n in enumerate(lengths):
        assert state.kept[i, :n].tolist() == ref_kept[i]
        torch.testing.assert_close(
            state.boundary_prob[i, :n].double(), ref_prob[i].detach(), **float32
        )
        torch.testing.assert_close(out[i, :n].double(), ref_out[i].detach(), **float32)
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:]))
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **float32)
    modules = {"q": layer.q_proj, "k": layer.k_proj, "res_w": layer.residual_proj}
    modules["inner_w"] = inner
    for name, module in modules.items():
        torch.testing.assert_close(module.weight.grad.double(), params[name].grad, **float32)


# --- padding, lengths, identity ------------------------------------------------------------


def test_padding_never_reaches_valid_outputs():
    lengths = torch.tensor([9, 6])
    layer, inner = random_layer(6, seed=5)
    x = flip_frames([9, 6], 6, seed=6)
    x_zero_pad = x.clone()
    x_zero_pad[1, 6:] = 0.0
    x_zero_pad.requires_grad_()
    out_a, chunked_a, chunk_lengths, state_a = run_layer(layer, inner, x, lengths)
    out_b, chunked_b, _, state_b = run_layer(layer, inner, x_zero_pad, lengths)
    out_alone, chunked_alone, _, _ = run_layer(layer, inner, x[1:, :6], lengths[1:])

    assert torch.equal(chunked_a, chunked_b)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(out_a[1, :6], out_alone[0])
    torch.testing.assert_close(chunked_a[1, : chunk_lengths[1]], chunked_alone[0])
    assert layer.ratio_loss(state_a) == layer.ratio_loss(state_b)
    # No gradient, and no NaN from the zero padding frames, flows into padding.
    (out_b[1, :6].sum() + layer.ratio_loss(state_b)).backward()
    assert torch.isfinite(x_zero_pad.grad).all()
    assert torch.equal(x_zero_pad.grad[1, 6:], torch.zeros(3, 6))


def test_chunked_lengths_and_masks_per_utterance():
    lengths = [11, 7, 1]
    layer, _ = random_layer(6, seed=7)
    x = flip_frames(lengths, 6, seed=8)
    x_chunked, chunk_lengths, state = layer.chunk(x, torch.tensor(lengths))
    for i, n in enumerate(lengths):
        frames = x[i, :n]
        p = torch.ones(n)  # boundary probabilities computed here with torch's cosine
        p[1:] = (1 - F.cosine_similarity(layer.q_proj(frames[1:]), layer.k_proj(frames[:-1]))) / 2
        expected = frames[p >= 0.5].detach()
        m = len(expected)
        assert chunk_lengths[i] == m
        assert torch.equal(x_chunked[i, :m], expected)
        assert torch.equal(x_chunked[i, m:], torch.zeros_like(x_chunked[i, m:]))
        assert state.chunk_mask[i].tolist() == [j < m for j in range(x_chunked.size(1))]
    assert x_chunked.size(1) == chunk_lengths.max()
    assert state.compression_ratio.item() == pytest.approx(chunk_lengths.sum().item() / 19)


def test_all_boundaries_make_the_identity_path_plus_residual():
    # Opposite neighbours: p = 1 everywhere, every frame kept, the EMA keeps each frame as is.
    torch.manual_seed(9)
    layer = DynamicChunking(6).double()
    with torch.no_grad():
        layer.residual_proj.weight.normal_()
        layer.residual_proj.bias.normal_()
    sign = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    x = sign[None, :, None] * torch.randn(2, 1, 6, dtype=torch.float64)
    lengths = torch.tensor([8, 8])
    x_chunked, chunk_lengths, state = layer.chunk(x, lengths)
    assert chunk_lengths.tolist() == [8, 8]
    assert torch.equal(x_chunked, x)
    out = layer.dechunk(x_chunked, state)
    torch.testing.assert_close(out, x + layer.residual_proj(x), rtol=0, atol=1e-12)


def test_fresh_layer_starts_without_residual():
    # H-Net's zero-initialised residual: a fresh layer outputs the upsampled chunk path only.
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    x = sign[None, :, None] * torch.randn(1, 1, 4, dtype=torch.float64)  # kept: 0, 1, 3
    layer = DynamicChunking(4).double()
    x_chunked, _, state = layer.chunk(x, torch.tensor([6]))
    out = layer.dechunk(x_chunked, state)
    torch.testing.assert_close(out, x[:, [0, 1, 1, 3, 3, 3]], rtol=0, atol=1e-12)


# --- min_lengths ---------------------------------------------------------------------------


def test_min_lengths_keeps_the_most_likely_extra_frames():
    # p = [1, .030, 0, .25, .0076]: only the first frame is a boundary.
    x = plane_frames([0, 20, 20, 80, 90]).expand(3, -1, -1)
    layer = DynamicChunking(4)
    lengths = torch.tensor([5, 5, 5])
    _, chunk_lengths, state = layer.chunk(x, lengths, min_lengths=torch.tensor([1, 3, 9]))
    assert state.kept.tolist() == [
        [True, False, False, False, False],
        [True, True, False, True, False],
        [True] * 5,
    ]
    assert chunk_lengths.tolist() == [1, 3, 5]
    assert state.compression_ratio.item() == pytest.approx(9 / 15)
    assert state.boundary_ratio.item() == pytest.approx(3 / 15)
    # The ratio loss judges the router's own decisions: one boundary per utterance.
    _, _, plain = layer.chunk(x, lengths)
    assert layer.ratio_loss(state) == layer.ratio_loss(plain)


def test_min_lengths_never_keeps_padding():
    x = plane_frames([0, 20, 20, 80, 90]).expand(2, -1, -1)
    _, chunk_lengths, state = DynamicChunking(4).chunk(
        x, torch.tensor([5, 2]), min_lengths=torch.tensor([4, 4])
    )
    assert chunk_lengths.tolist() == [4, 2]
    assert state.kept[1].tolist() == [True, True, False, False, False]


# --- configuration, initialisation, aux report ---------------------------------------------


@pytest.mark.parametrize("target_ratio", [0.0, 1.0, -0.5, 2.0])
def test_invalid_target_ratio_is_rejected(target_ratio):
    with pytest.raises(ValueError, match="target_ratio"):
        DynamicChunking(4, target_ratio=target_ratio)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="ratio_loss_weight"):
        DynamicChunking(4, ratio_loss_weight=-1.0)
    layer = DynamicChunking(4)
    with pytest.raises(ValueError, match="min_lengths"):
        layer.chunk(torch.zeros(2, 3, 4), torch.tensor([3, 3]), min_lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="4 features"):
        layer.chunk(torch.zeros(2, 3, 5), torch.tensor([3, 3]))


def test_without_dechunking_every_parameter_gets_a_gradient():
    """A chunking-only layer (compressed encoder output) has no residual projection: DDP refuses
    parameters that get no gradient."""
    layer = DynamicChunking(4, dechunks=False)
    assert layer.residual_proj is None
    x = flip_frames([7, 5], 4, seed=3)
    x_chunked, _, state = layer.chunk(x, torch.tensor([7, 5]))
    (x_chunked.sum() + layer.ratio_loss(state)).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.any(), name
    with pytest.raises(RuntimeError, match="dechunks=False"):
        layer.dechunk(x_chunked, state)


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_normal"])
def test_espnet_init_keeps_identity_router_and_zero_residual(init):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), DynamicChunking(4))
    initialize(model, init)
    layer = model[1]
    assert torch.equal(layer.q_proj.weight, torch.eye(4))
    assert torch.equal(layer.k_proj.weight, torch.eye(4))
    assert not layer.residual_proj.weight.any() and not layer.residual_proj.bias.any()


def test_chunk_reports_the_weighted_ratio_loss_and_compression():
    model = torch.nn.ModuleDict({"chunking": DynamicChunking(4, ratio_loss_weight=0.5)})
    x = flip_frames([7, 5], 4, seed=11)
    _, _, state = model["chunking"].chunk(x, torch.tensor([7, 5]))
    report = collect_aux(model)
    loss = model["chunking"].ratio_loss(state)
    torch.testing.assert_close(report.losses["chunking.ratio_loss"], 0.5 * loss)
    assert report.losses["chunking.ratio_loss"].requires_grad
    torch.testing.assert_close(report.stats["chunking.ratio_loss"], loss.detach())
    torch.testing.assert_close(report.stats["chunking.compression"], state.compression_ratio)
    assert collect_aux(model).losses == {}  # collecting pops
