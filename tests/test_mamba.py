"""Mamba / BiMamba: mamba_ssm's parameters and init, the recurrent definition, padding."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from espnet2.torch_utils.initialize import initialize

from espnet_plugin.nets import cpu_kernels
from espnet_plugin.nets import mamba as mamba_module
from espnet_plugin.nets.mamba import BiMamba, Mamba

D_MODEL, D_STATE, D_CONV, EXPAND = 40, 8, 4, 2


def expected_shapes(d_model, d_state, d_conv, expand, bias=False, conv_bias=True, suffix=""):
    """mamba_ssm's Mamba parameters, written out from mamba_simple.py's formulas."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    shapes = {
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    if conv_bias:
        shapes["conv1d.bias"] = (d_inner,)
    if bias:
        shapes["in_proj.bias"] = (2 * d_inner,)
        shapes["out_proj.bias"] = (d_model,)
    return shapes


def shapes_of(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bias,conv_bias", [(False, True), (True, False)])
def test_mamba_state_dict_follows_mamba_ssm(bias, conv_bias):
    m = Mamba(
        D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND, bias=bias, conv_bias=conv_bias
    )
    assert shapes_of(m) == expected_shapes(D_MODEL, D_STATE, D_CONV, EXPAND, bias, conv_bias)


def test_bimamba_state_dicts():
    base = expected_shapes(D_MODEL, D_STATE, D_CONV, EXPAND)
    assert shapes_of(BiMamba(D_MODEL, "none", d_state=D_STATE)) == base
    # Vim (bimamba_type="v2"): a second set of direction parameters with Vim's names.
    vim_backward = {
        "conv1d_b.weight": base["conv1d.weight"],
        "conv1d_b.bias": base["conv1d.bias"],
        "x_proj_b.weight": base["x_proj.weight"],
        "dt_proj_b.weight": base["dt_proj.weight"],
        "dt_proj_b.bias": base["dt_proj.bias"],
        "A_b_log": base["A_log"],
        "D_b": base["D"],
    }
    assert shapes_of(BiMamba(D_MODEL, "shared", d_state=D_STATE)) == {**base, **vim_backward}
    concat = {
        **base,
        **{f"mamba_b.{k}": v for k, v in base.items()},
        "concat_proj.weight": (D_MODEL, 2 * D_MODEL),
        "concat_proj.bias": (D_MODEL,),
    }
    assert shapes_of(BiMamba(D_MODEL, "concat", d_state=D_STATE)) == concat


def import_mamba_ssm():
    try:
        from mamba_ssm import Mamba as MambaSSM
    except (ImportError, OSError) as err:  # no package, or no compiled CUDA extension
        pytest.skip(f"mamba_ssm not importable: {err}")
    return MambaSSM


def test_same_parameters_and_init_as_mamba_ssm():
    MambaSSM = import_mamba_ssm()
    torch.manual_seed(0)
    theirs = MambaSSM(D_MODEL, d_state=D_STATE).state_dict()
    torch.manual_seed(0)
    ours = Mamba(D_MODEL, d_state=D_STATE).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def check_direction_init(dt_proj, A_log, D, dt_min, dt_max, dt_rank, dt_scale=1.0):
    dt = F.softplus(dt_proj.bias.double())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    # Log-uniform: about half of the dt lie below the geometric mean of the range.
    below = (dt < math.sqrt(dt_min * dt_max)).double().mean()
    assert 0.35 < below < 0.65
    assert dt_proj.weight.abs().max() <= dt_rank**-0.5 * dt_scale
    A = -torch.exp(A_log)
    torch.testing.assert_close(A, -torch.arange(1.0, A.shape[1] + 1).expand_as(A))
    assert torch.equal(D, torch.ones_like(D))


def test_init_ranges():
    m = BiMamba(D_MODEL, "shared", expand=4, dt_min=0.002, dt_max=0.05, dt_scale=0.5)
    for direction in m.directions():
        check_direction_init(
            direction.dt_proj, direction.A_log, direction.D, 0.002, 0.05, m.dt_rank, 0.5
        )


def test_dt_floor_and_constant_init():
    m = Mamba(D_MODEL, dt_min=1e-6, dt_max=1e-3, dt_init_floor=1e-4, dt_init="constant")
    assert F.softplus(m.dt_proj.bias.double()).min() >= 1e-4 * (1 - 1e-5)
    torch.testing.assert_close(m.dt_proj.weight, torch.full_like(m.dt_proj.weight, 3**-0.5))


def test_espnet_init_keeps_the_ssm_init():
    """ESPnet's --init redraws A_log and zeroes dt_proj.bias; the module restores both."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"mixer": BiMamba(D_MODEL, "shared")})
    in_proj_before = model["mixer"].in_proj.weight.clone()
    for init in ("xavier_uniform", "kaiming_normal"):
        initialize(model, init)
        for d in model["mixer"].directions():
            check_direction_init(d.dt_proj, d.A_log, d.D, 0.001, 0.1, model["mixer"].dt_rank)
    assert not torch.equal(model["mixer"].in_proj.weight, in_proj_before)


def recurrent_mix(xz, p):
    """mamba_simple.py's ``step``, one frame at a time: in_proj output -> gated y (B, T, d)."""
    x, z = xz.chunk(2, dim=-1)
    batch, length, d_inner = x.shape
    conv_state = x.new_zeros(batch, d_inner, p.conv1d.kernel_size[0])
    ssm_state = x.new_zeros(batch, d_inner, p.A_log.shape[1])
    A = -torch.exp(p.A_log)
    ys = []
    for t in range(length):
        conv_state = torch.roll(conv_state, shifts=-1, dims=-1)
        conv_state[:, :, -1] = x[:, t]
        xt = F.silu((conv_state * p.conv1d.weight[:, 0]).sum(-1) + p.conv1d.bias)
        dt, B, C = torch.split(
            p.x_proj(xt), [p.dt_proj.in_features, A.shape[1], A.shape[1]], dim=-1
        )
        dt = F.softplus(p.dt_proj(dt))
        ssm_state = ssm_state * torch.exp(dt[..., None] * A) + (dt * xt)[..., None] * B[:, None]
        y = (ssm_state * C[:, None]).sum(-1) + p.D * xt
        ys.append(y * F.silu(z[:, t]))
    return torch.stack(ys, dim=1)


def random_mixer(mode, dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    m = BiMamba(D_MODEL, mode, d_state=D_STATE, **options).to(dtype)
    with torch.no_grad():  # as after training: nonzero biases, A and D off their init values
        for name, p in m.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name:
                p.normal_(0, 0.1)
            elif name.startswith(("A_", "D")) or name.endswith((".A_log", ".D")):
                p.add_(torch.randn_like(p), alpha=0.1)
    return m


@pytest.mark.parametrize("mode", ["none", "shared", "concat"])
def test_matches_recurrent_definition_float64(mode, cpu_path):
    m = random_mixer(mode, bias=True)
    x = torch.randn(2, 29, D_MODEL, dtype=torch.float64)

    def flip(v):
        return v.flip(1)

    with torch.no_grad():
        xz = m.in_proj(x)
        forward = recurrent_mix(xz, m.directions()[0])
        if mode == "none":
            expected = m.out_proj(forward)
        elif mode == "shared":
            backward = flip(recurrent_mix(flip(xz), m.directions()[1]))
            expected = m.out_proj((forward + backward) / 2)
        else:
            b = m.mamba_b
            backward = flip(b.out_proj(recurrent_mix(b.in_proj(flip(x)), b.directions()[0])))
            expected = m.concat_proj(torch.cat([m.out_proj(forward), backward], dim=-1))
        torch.testing.assert_close(m(x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["none", "shared", "concat"])
def test_padding_never_leaks(mode, cpu_path):
    """Each utterance alone == the same utterance inside a batch padded with large garbage."""
    m = random_mixer(mode, dtype=torch.float32)
    lengths = torch.tensor([23, 9, 16])
    x = torch.randn(3, 23, D_MODEL)
    pad = torch.arange(23)[None, :] >= lengths[:, None]
    x[pad] = 1e3 * torch.randn(int(pad.sum()), D_MODEL)
    with torch.no_grad():
        batched = m(x, ~pad)
        for i, length in enumerate(lengths.tolist()):
            alone = m(x[i : i + 1, :length])
            torch.testing.assert_close(batched[i, :length], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "shared", "concat"])
def test_which_frames_see_the_future(mode, cpu_path):
    m = random_mixer(mode)
    x = torch.randn(1, 20, D_MODEL, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12] += 1.0
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    change = (y - y2).abs().amax(-1)[0]
    if mode == "none":
        assert change[:12].max() == 0  # causal: nothing before frame 12 moves
    else:
        assert change[:12].min() > 1e-6  # every earlier frame reads frame 12
    assert change[12:].min() > 1e-6


def test_gradients_flow_to_every_parameter(cpu_path):
    m = random_mixer("shared", dtype=torch.float32)
    mask = torch.arange(11)[None, :] < torch.tensor([11, 6])[:, None]
    m(torch.randn(2, 11, D_MODEL), mask).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_options_are_rejected_by_name():
    with pytest.raises(ValueError, match="bidirectional='both'.*'shared', 'concat', 'none'"):
        BiMamba(D_MODEL, "both")
    with pytest.raises(ValueError, match="dt_init='normal'"):
        Mamba(D_MODEL, dt_init="normal")
    with pytest.raises(ValueError, match="dt_rank=0"):
        Mamba(D_MODEL, dt_rank=0)


def test_path_is_logged_once(caplog, cpu_path):
    mamba_module._announce_path.cache_clear()
    m = Mamba(D_MODEL)
    with caplog.at_level(logging.INFO, logger=mamba_module.__name__):
        m(torch.randn(1, 5, D_MODEL))
        m(torch.randn(1, 5, D_MODEL))
    messages = [r.getMessage() for r in caplog.records if "Mamba on" in r.getMessage()]
    path = "fused C++ CPU kernels" if cpu_path == "cpu_kernels" else "PyTorch selective scan"
    assert messages == [f"Mamba on cpu: using the {path}"]


@pytest.mark.parametrize("lengths", [[1], [29, 1, 14]], ids=["one_frame", "padded_batch"])
def test_cpu_kernels_equal_the_pytorch_path_on_every_frame(cpu_kernels_extension, monkeypatch,
                                                           lengths):
    """The kernels walk the backward direction in place of reverse_within_lengths' copies: same
    outputs, padding included, and the same gradients for the input and every parameter."""
    m = random_mixer("shared")
    lengths = torch.tensor(lengths)
    x = torch.randn(len(lengths), int(lengths.max()), D_MODEL, dtype=torch.float64)
    mask = torch.arange(x.shape[1])[None] < lengths[:, None]
    results = []
    for extension in (cpu_kernels_extension, None):
        monkeypatch.setattr(cpu_kernels, "extension", lambda extension=extension: extension)
        m.zero_grad()
        x_ = x.clone().requires_grad_()
        y = m(x_, mask)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append((y.detach(), x_.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y, grad_x, grads), (y_ref, grad_x_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-10, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-9, msg=name)


def test_cuda_kernels_match_pytorch_path():
    if not torch.cuda.is_available() or mamba_module._fused_kernels() is None:
        pytest.skip("needs CUDA with mamba_ssm and causal_conv1d")
    m = random_mixer("shared", dtype=torch.float32)
    x = torch.randn(2, 300, D_MODEL)
    lengths = torch.tensor([300, 170])
    results = []
    for device in ("cpu", "cuda"):
        m_dev, x_dev = m.to(device), x.to(device).requires_grad_()
        m_dev.zero_grad()
        y = m_dev(x_dev, torch.arange(300, device=x_dev.device)[None] < lengths.to(x_dev.device)[:, None])
        y.square().sum().backward()
        grads = {n: p.grad.cpu() for n, p in m_dev.named_parameters()}
        results.append((y.detach().cpu(), x_dev.grad.cpu(), grads))
    (y_cpu, gx_cpu, g_cpu), (y_gpu, gx_gpu, g_gpu) = results
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gx_gpu, gx_cpu, rtol=1e-3, atol=1e-3)
    for name in g_cpu:
        torch.testing.assert_close(g_gpu[name], g_cpu[name], rtol=1e-3, atol=1e-3, msg=name)
