"""The GPU self-check: run it on a machine with CUDA (a few minutes on one GPU)

    python -m pytest tests/test_gpu.py -v -rs

mamba_ssm's fused kernels agree with the PyTorch scan on the GPU (forward and backward, both
directions, a padded batch); every training config of both recipes takes a bf16 training step
on the GPU as ESPnet's use_amp runs it; two processes take a DDP step together when two GPUs are
there; a model decodes on the GPU with the cache measured and the GPU's peak memory. Without a
GPU every test here skips and says why.
"""

import os
import socket

import pytest
import torch
import yaml

import espnet_plugin  # noqa: F401  (registers the classes the configs name)
from conftest import LIBRISPEECH_MINI, RECIPE_RATES, REPO, build_recipe_model
from espnet_plugin.nets import mamba as mamba_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
CONFIGS = sorted({(recipe, path.resolve()) for recipe in RECIPE_RATES for path in
                  (REPO / "egs2" / recipe / "asr1" / "conf").rglob("train_asr*.yaml")})
D_MODEL = 144


def bidirectional_mamba():
    torch.manual_seed(0)
    return mamba_module.BiMamba(D_MODEL, "shared").cuda()


def run_mamba(module, x, mask):
    module.zero_grad()
    x = x.clone().requires_grad_()
    y = module(x, mask)
    y.square().sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def test_fused_kernels_agree_with_the_pytorch_scan(monkeypatch):
    if mamba_module._fused_kernels() is None:
        pytest.skip("mamba_ssm / causal_conv1d are not installed (pip install -e '.[cuda]')")
    module = bidirectional_mamba()
    x = torch.randn(3, 400, D_MODEL, device="cuda")
    lengths = torch.tensor([400, 251, 37], device="cuda")
    mask = torch.arange(400, device="cuda")[None] < lengths[:, None]
    fused = run_mamba(module, x, mask)
    monkeypatch.setattr(mamba_module, "_fused_kernels", lambda: None)
    reference = run_mamba(module, x, mask)
    valid = mask[..., None]
    torch.testing.assert_close(fused[0] * valid, reference[0] * valid, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fused[1] * valid, reference[1] * valid, rtol=1e-3, atol=1e-3)
    for name in reference[2]:
        torch.testing.assert_close(fused[2][name], reference[2][name], rtol=2e-3, atol=2e-3,
                                   msg=name)


@pytest.mark.parametrize("recipe, config", CONFIGS, ids=[str(c.relative_to(REPO)) for _, c in CONFIGS])
def test_every_config_takes_a_bf16_step(recipe, config, char_token_list):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    rate = RECIPE_RATES[recipe]
    _, model = build_recipe_model(config, rate, char_token_list)
    model = model.cuda().train()
    speech = torch.randn(2, 3 * rate, device="cuda")
    lengths = torch.tensor([3 * rate, 2 * rate], device="cuda")
    text = torch.randint(2, 28, (2, 8), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # what ESPnet's use_amp does here
        loss, _, _ = model(speech, lengths, text, torch.tensor([8, 5], device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            assert torch.isfinite(param.grad).all(), name


def ddp_step(rank: int, world: int, port: int, config: str, tokens: str, results) -> None:
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    _, model = build_recipe_model(REPO / config, 8000, tokens)
    model = torch.nn.parallel.DistributedDataParallel(model.cuda(), device_ids=[rank])
    torch.manual_seed(rank)  # each rank its own batch
    speech = torch.randn(2, 16000, device="cuda")
    loss, _, _ = model(speech, torch.tensor([16000, 12000], device="cuda"),
                       torch.randint(2, 28, (2, 6), device="cuda"), torch.tensor([6, 4], device="cuda"))
    loss.backward()
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    results[rank] = grad.flatten()[:16].cpu()
    torch.distributed.destroy_process_group()


def test_two_gpus_take_a_ddp_step_together(char_token_list):
    if torch.cuda.device_count() < 2:
        pytest.skip("fewer than two GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(
        ddp_step, args=(2, port, "egs2/asterisk_en/asr1/conf/train_asr.yaml",
                        str(char_token_list), results), nprocs=2)
    assert torch.equal(results[0], results[1])  # gradients all-reduced


def test_decoding_on_the_gpu_measures_cache_and_peak_memory(tmp_path):
    from espnet2.tasks.asr import ASRTask

    from espnet_plugin.benchmarks import kv_cache

    flacs = sorted((LIBRISPEECH_MINI / "LibriSpeech").rglob("*.flac"))[:2]
    if not flacs:
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH_MINI}")
    config = REPO / "egs2/asterisk_en/asr1/conf/tuning/train_asr_conformer_mla_small.yaml"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(["<blank>", "<unk>", *"abcdefghijklmnopqrstuvwxyz' ", "<sos/eos>"]))
    args = ASRTask.get_parser().parse_args(["--config", str(config), "--token_list", str(tokens),
                                            "--token_type", "char", "--frontend_conf", "fs=16000"])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    scp = tmp_path / "wav.scp"
    scp.write_text("".join(f"u{i} {path}\n" for i, path in enumerate(flacs)))
    stats = kv_cache.main([
        "--asr_train_config", str(tmp_path / "config.yaml"), "--asr_model_file",
        str(tmp_path / "model.pth"), "--data_path_and_name_and_type", f"{scp},speech,sound",
        "--output_dir", str(tmp_path / "out"), "--device", "cuda", "--beam_size", "4",
        "--maxlenratio", "0.2"])
    assert stats["peak_memory_kind"].startswith("torch.cuda.max_memory_allocated")
    assert stats["peak_memory_bytes"] > 0
    assert stats["kv_cache"]["measured_equals_analytic"]
    assert os.path.isfile(tmp_path / "out" / "decode_stats.json")
