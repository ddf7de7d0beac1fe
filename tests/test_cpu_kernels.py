"""The fused CPU kernels (espnet_plugin/csrc/mamba_cpu.cpp) against float64 references: the
selective scan and Mamba's causal convolution, forwards and backwards in time within lengths, the
convolution module's centred one, every gradient, any input layout; and the PyTorch fallback
where the extension cannot be built."""

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from selective_scan_reference import NAMES, make_inputs, outputs_and_grads, reference

from espnet_plugin.nets import cpu_kernels, mamba
from espnet_plugin.nets.blocks import ConvolutionModule
from espnet_plugin.nets.mamba import reverse_within_lengths
from espnet_plugin.nets.scan import selective_scan

# 1 and 2 frames; 23; one checkpoint interval (64) and across intervals (65, 130).
LENGTHS = [1, 2, 23, 64, 65, 130]
# 6: fewer channels than a block of 16 lanes; 21: a full block and 5 channels alone.
CHANNELS = [6, 21]


def assert_all_close(got, want, names, tolerance):
    out, grads = got
    ref_out, ref_grads = want
    torch.testing.assert_close(out, ref_out, rtol=tolerance, atol=tolerance)
    for name in names:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=tolerance, atol=tolerance,
                                   msg=name)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_scan_matches_reference_float64(cpu_kernels_extension, batch, channels, length):
    inputs = make_inputs(batch, channels, 4, length)
    weight = torch.randn(batch, channels, length, dtype=torch.float64)
    got = outputs_and_grads(cpu_kernels.selective_scan, inputs, weight, delta_softplus=True)
    want = outputs_and_grads(reference, inputs, weight, delta_softplus=True)
    assert_all_close(got, want, NAMES, 1e-9)


def test_scan_without_skip_gate_bias_or_softplus(cpu_kernels_extension):
    inputs = {k: v for k, v in make_inputs(2, 21, 5, 70).items() if k in ("u", "delta", "A", "B", "C")}
    inputs["delta"] = inputs["delta"].abs()  # used as the step size directly
    weight = torch.randn(2, 21, 70, dtype=torch.float64)
    got = outputs_and_grads(cpu_kernels.selective_scan, inputs, weight)
    want = outputs_and_grads(reference, inputs, weight)
    assert_all_close(got, want, inputs, 1e-9)


def channels_last(x):
    """The same values stored time-major, as the encoder's tensors are."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def reverse_series(x, lengths):
    """reverse_within_lengths on a (b, channels, l) tensor."""
    return reverse_within_lengths(x.transpose(1, 2), lengths).transpose(1, 2)


@pytest.mark.parametrize("lengths", [None, [23, 9, 1]], ids=["full", "padded"])
def test_scan_backwards_in_time_is_the_scan_of_reversed_inputs(cpu_kernels_extension, lengths):
    """On every frame, padding included: the backward direction of BiMamba without copies."""
    lengths = None if lengths is None else torch.tensor(lengths)
    inputs = make_inputs(3, 21, 4, 23)
    weight = torch.randn(3, 21, 23, dtype=torch.float64)
    series = ("u", "delta", "B", "C", "z")

    def reversed_reference(**x):
        x = {k: reverse_series(v, lengths) if k in series else v for k, v in x.items()}
        return reverse_series(reference(**x, delta_softplus=True), lengths)

    got = outputs_and_grads(cpu_kernels.selective_scan, inputs, weight, delta_softplus=True,
                            reverse=True, lengths=lengths)
    assert_all_close(got, outputs_and_grads(reversed_reference, inputs, weight), NAMES, 1e-9)


def test_scan_reads_any_layout(cpu_kernels_extension):
    """Channel-major or time-major u, delta, z; B and C as strided views of one projection."""
    inputs = make_inputs(2, 21, 4, 30)
    projection = torch.cat([inputs["B"], inputs["C"]], dim=1).transpose(1, 2).contiguous()
    strided = dict(inputs, B=projection[..., :4].transpose(1, 2), C=projection[..., 4:].transpose(1, 2))
    for name in ("u", "delta", "z"):
        strided[name] = channels_last(inputs[name])
    expected = cpu_kernels.selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(cpu_kernels.selective_scan(**strided, delta_softplus=True), expected,
                               rtol=1e-12, atol=1e-12)


def conv_reference(x, weight, bias=None):
    """mamba_simple.py's silu(conv1d(x)[..., :l]) with a depthwise, left-padded convolution."""
    width = weight.shape[1]
    out = F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=x.shape[1])
    return F.silu(out[..., : x.shape[2]])


def conv_inputs(batch, channels, length, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, channels, length, generator=g, dtype=torch.float64),
        "weight": torch.randn(channels, 4, generator=g, dtype=torch.float64),
    }
    if bias:
        inputs["bias"] = torch.randn(channels, generator=g, dtype=torch.float64)
    return inputs


@pytest.mark.parametrize("length", [1, 2, 3, 23])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_pytorch_float64(cpu_kernels_extension, length, channels, bias):
    inputs = conv_inputs(3, channels, length, bias)
    inputs["x"] = channels_last(inputs["x"])  # how the encoder passes it: a slice of in_proj
    weight = torch.randn(3, channels, length, dtype=torch.float64)
    got = outputs_and_grads(cpu_kernels.causal_conv1d, inputs, weight)
    assert_all_close(got, outputs_and_grads(conv_reference, inputs, weight), inputs, 1e-12)


@pytest.mark.parametrize("lengths", [None, [23, 9, 1]], ids=["full", "padded"])
def test_conv_backwards_in_time_is_the_conv_of_the_reversed_input(cpu_kernels_extension, lengths):
    lengths = None if lengths is None else torch.tensor(lengths)
    inputs = conv_inputs(3, 21, 23)
    weight = torch.randn(3, 21, 23, dtype=torch.float64)

    def reversed_reference(x, weight, bias):
        return reverse_series(conv_reference(reverse_series(x, lengths), weight, bias), lengths)

    got = outputs_and_grads(cpu_kernels.causal_conv1d, inputs, weight, reverse=True,
                            lengths=lengths)
    want = outputs_and_grads(reversed_reference, inputs, weight)
    assert_all_close(got, want, inputs, 1e-12)


@pytest.mark.parametrize("length", [1, 2, 16, 40])  # shorter and longer than the width
@pytest.mark.parametrize("width", [3, 31])
def test_centred_depthwise_conv_matches_pytorch_float64(cpu_kernels_extension, length, width):
    g = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(2, 21, length, generator=g, dtype=torch.float64),
        "weight": torch.randn(21, width, generator=g, dtype=torch.float64),
        "bias": torch.randn(21, generator=g, dtype=torch.float64),
    }
    weight = torch.randn(2, 21, length, dtype=torch.float64)

    def pytorch(x, weight, bias):
        return F.conv1d(x, weight[:, None], bias, padding=width // 2, groups=x.shape[1])

    def fused(x, weight, bias):
        return cpu_kernels.depthwise_conv1d(x, weight, bias, padding=width // 2)

    got = outputs_and_grads(fused, inputs, weight)
    assert_all_close(got, outputs_and_grads(pytorch, inputs, weight), inputs, 1e-12)


def test_convolution_module_equals_its_pytorch_path(cpu_kernels_extension, monkeypatch):
    """The Conformer convolution module with the fused depthwise convolution, padding included."""
    torch.manual_seed(0)
    module = ConvolutionModule(16, kernel_size=5).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    mask = torch.arange(23)[None] < torch.tensor([23, 11])[:, None]
    weight = torch.randn(2, 23, 16, dtype=torch.float64)
    results = []
    for extension in (cpu_kernels_extension, None):
        monkeypatch.setattr(cpu_kernels, "extension", lambda extension=extension: extension)
        module.zero_grad()
        got = outputs_and_grads(lambda x: module(x, mask), {"x": x}, weight)
        results.append((got, {n: p.grad for n, p in module.named_parameters()}))
    (got, grads), (want, grads_ref) = results
    assert_all_close(got, want, ["x"], 1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.fixture
def failing_build(monkeypatch):
    """The extension's build fails (no compiler, say); the cached answer is reset afterwards."""

    def build(verbose=False):
        raise RuntimeError("Error building extension 'x':\n/bin/sh: 1: c++: not found\nninja: build stopped")

    monkeypatch.setattr(cpu_kernels, "build", build)
    cpu_kernels.extension.cache_clear()
    yield
    cpu_kernels.extension.cache_clear()


def test_a_failed_build_falls_back_to_pytorch(failing_build, caplog):
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.extension() is None
    assert "fused CPU kernels unavailable" in caplog.text and "c++: not found" in caplog.text
    assert mamba.kernel_path(torch.device("cpu")) == "pytorch"
    inputs = make_inputs(2, 6, 4, 23)
    weight = torch.randn(2, 6, 23, dtype=torch.float64)
    got = outputs_and_grads(selective_scan, inputs, weight, delta_softplus=True)
    assert_all_close(got, outputs_and_grads(reference, inputs, weight, delta_softplus=True), NAMES,
                     1e-9)


def test_the_build_is_cached_per_torch_version_cpu_capability_and_checkout(monkeypatch):
    directory = cpu_kernels.build_directory().name
    assert torch.__version__.replace("+", "_") in directory
    assert torch.backends.cpu.get_cpu_capability() in directory
    monkeypatch.setattr(cpu_kernels, "SOURCE", Path("/another/checkout") / cpu_kernels.SOURCE.name)
    assert cpu_kernels.build_directory().name != directory


def test_every_process_builds_with_the_same_ninja(tmp_path, monkeypatch):
    """Another ninja first on PATH (a system one) would make each process redo the cached build."""
    ninja = pytest.importorskip("ninja")
    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cpu_kernels.use_our_ninja()
    assert Path(shutil.which("ninja")).resolve() == (Path(ninja.BIN_DIR) / "ninja").resolve()
    path = os.environ["PATH"]
    cpu_kernels.use_our_ninja()
    assert os.environ["PATH"] == path  # already first: PATH is left alone
