"""convert_attention on whole ESPnet experiments of the small recipe: the tiny ConMamba trained
there (ESPnet's stock Transformer decoder) and a Conformer with this project's rotary MHA, built
by ESPnet's ASRTask. The output loads and decodes through ESPnet, fine-tunes from --init_param
with exactly its weights, equals the original at full rank, and bad options write nothing."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ASR_EXP, copy_recipe, run_recipe, stats_dir
from espnet_plugin.cli import UserError
from espnet_plugin.convert_attention import main as convert

CALIB = ["--calib_data", "dump/raw/dev/wav.scp", "--calib_utts", "6"]


@pytest.fixture(scope="module")
def work(recipe, tmp_path_factory):
    """A copy of the finished small recipe, with a random-weight rotary Conformer-MHA
    experiment beside the trained ConMamba one."""
    from espnet2.tasks.asr import ASRTask

    work = copy_recipe(recipe, tmp_path_factory.mktemp("convert") / "asr1", ignore=())
    exp = work / "exp" / "asr_conformer_mha"
    exp.mkdir()
    config = {
        "encoder": "conformer_x",
        "encoder_conf": {"output_size": 32, "attention_heads": 4, "linear_units": 32,
                         "num_blocks": 2, "cnn_module_kernel": 3},
        "decoder": "cached_transformer",
        "decoder_conf": {"attention_heads": 4, "linear_units": 32, "num_blocks": 1,
                         "position": "rotary"},
        "frontend_conf": {"n_fft": 256, "win_length": 200, "hop_length": 80, "n_mels": 40},
    }
    (exp / "train.yaml").write_text(yaml.safe_dump(config))
    args = ASRTask.get_parser().parse_args([
        "--config", str(exp / "train.yaml"),
        "--token_list", str(work / "data/en_token_list/char/tokens.txt"), "--token_type", "char",
        "--frontend_conf", "fs=8000", "--normalize", "global_mvn", "--normalize_conf",
        f"stats_file={stats_dir(work) / 'train/feats_stats.npz'}",
    ])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    with torch.no_grad():  # biases as a trained model has them
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".linear_" in name:
                param.normal_(0, 0.1)
    args.token_list = [line.split()[0] for line in
                       (work / "data/en_token_list/char/tokens.txt").read_text().splitlines()]
    (exp / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), exp / "model.pth")
    return work


def run_convert(work, monkeypatch, exp, out, *options):
    monkeypatch.chdir(work)
    model = "model.pth" if (work / exp / "model.pth").exists() else "valid.acc.ave.pth"
    return convert(["--asr_train_config", f"{exp}/config.yaml", "--asr_model_file",
                    f"{exp}/{model}", "--out_dir", out, *CALIB, *options])


def test_stock_decoder_to_mla_loads_decodes_and_reports(work, monkeypatch):
    out = "exp/conmamba_mla/conversion"
    report = run_convert(work, monkeypatch, ASR_EXP, out, "--target", "mla",
                         "--kv_latent_dim", "24", "--beam_size", "2")
    config = yaml.safe_load((work / out / "config.yaml").read_text())
    assert config["decoder"] == "cached_transformer"
    assert config["decoder_conf"]["position"] == "absolute"
    assert config["decoder_conf"]["self_attention_type"] == "mla"
    assert config["decoder_conf"]["src_attention_conf"]["kv_latent_dim"] == 24
    assert report["options"]["modules"] == ["decoder_self", "decoder_cross"]
    assert len(report["modules"]) == 2 * config["decoder_conf"]["num_blocks"]
    for module in report["modules"]:
        assert 0 <= module["relative_error"] < 1 and 0 <= module["svd_tail_energy"] < 1
        assert module["cache_bytes_per_position_after"] == 24 * 4
    d_model = config["encoder_conf"]["output_size"]
    assert report["kv_cache"]["decoder_self"]["ratio"] == pytest.approx(24 / (2 * d_model))
    assert set(report["wer"]["converted"]) == {"greedy", "beam"}
    assert json.loads((work / out / "report.json").read_text()) == json.loads(json.dumps(report))

    # ESPnet loads it with every weight it expects, and its decoder decodes.
    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.tasks.asr import ASRTask

    model, _ = ASRTask.build_model_from_file(work / out / "config.yaml", work / out / "model.pth")
    saved = torch.load(work / out / "model.pth")
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    speech2text = Speech2Text(asr_train_config=work / out / "config.yaml",
                              asr_model_file=work / out / "model.pth", beam_size=2)
    wav = (work / "dump/raw/test/wav.scp").read_text().split()[1]
    import soundfile
    assert isinstance(speech2text(soundfile.read(wav, dtype="float32")[0])[0][0], str)


def test_full_rank_with_every_rotary_pair_reproduces_the_model(work, monkeypatch):
    exp = "exp/asr_conformer_mha"
    report = run_convert(work, monkeypatch, exp, "exp/full_mla/conversion", "--target", "mla",
                         "--rope_dim", "8", "--rope_key_heads", "4", "--kv_latent_dim", "32",
                         "--no_wer")
    assert report["options"]["modules"] == ["encoder_self", "decoder_self", "decoder_cross"]
    for module in report["modules"]:
        assert module["relative_error"] < 1e-5, module
    original, converted = report["loss"]["original"], report["loss"]["converted"]
    assert converted["loss"] == pytest.approx(original["loss"], rel=1e-4)


def test_gqa_pools_heads_and_partial_rope_costs_something(work, monkeypatch):
    exp = "exp/asr_conformer_mha"
    gqa = run_convert(work, monkeypatch, exp, "exp/gqa/conversion", "--target", "gqa",
                      "--n_kv_heads", "1", "--no_wer")
    assert gqa["kv_cache"]["all"]["ratio"] == pytest.approx(0.25)
    config = yaml.safe_load((work / "exp/gqa/conversion/config.yaml").read_text())
    assert config["encoder_conf"]["attention_type"] == "gqa"
    assert config["encoder_conf"]["attention_conf"] == {"n_kv_heads": 1}
    partial = run_convert(work, monkeypatch, exp, "exp/partial/conversion", "--target", "mla",
                          "--rope_dim", "2", "--kv_latent_dim", "14", "--no_wer")
    encoder = [m for m in partial["modules"] if m["group"] == "encoder_self"]
    assert all(len(m["rope_pairs"]) == 1 and m["relative_error"] > 1e-4 for m in encoder)


def test_fine_tuning_starts_from_exactly_the_converted_weights(work, monkeypatch, tmp_path):
    """ESPnet's --init_param loads what load_pretrained_model finds; every key must be found."""
    out = work / "exp/full_mla/conversion"
    if not out.exists():
        run_convert(work, monkeypatch, "exp/asr_conformer_mha", "exp/full_mla/conversion",
                    "--target", "mla", "--rope_dim", "8", "--rope_key_heads", "4",
                    "--kv_latent_dim", "32", "--no_wer")
    from espnet2.tasks.asr import ASRTask
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    model, _ = ASRTask.build_model_from_file(out / "config.yaml", None)
    load_pretrained_model(str(out / "model.pth"), model, "cpu")
    saved = torch.load(out / "model.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("options, message", [
    (["--target", "mla", "--kv_latent_dim", "999"], r"--kv_latent_dim 999 must lie in 1\.\.56"),
    (["--target", "mla", "--rope_dim", "3"], r"--rope_dim 3 must be an even number in 2\.\.8"),
    (["--target", "mla", "--modules", "encoder_cross"], r"--modules encoder_cross: unknown"),
    (["--target", "gqa", "--n_kv_heads", "3"], r"--n_kv_heads 3 must divide"),
])
def test_bad_options_are_named_and_nothing_is_written(work, monkeypatch, options, message):
    with pytest.raises(UserError, match=message):
        run_convert(work, monkeypatch, "exp/asr_conformer_mha", "exp/bad/conversion", *options,
                    "--no_wer")
    assert not (work / "exp/bad").exists()


def test_a_model_without_mha_and_a_full_out_dir_are_refused(work, monkeypatch):
    run_convert(work, monkeypatch, "exp/asr_conformer_mha", "exp/gqa1/conversion", "--target",
                "gqa", "--n_kv_heads", "2", "--no_wer")
    with pytest.raises(UserError, match="nothing to convert: the model has no multi-head"):
        convert(["--asr_train_config", "exp/gqa1/conversion/config.yaml", "--asr_model_file",
                 "exp/gqa1/conversion/model.pth", "--out_dir", "exp/gqa2", "--target", "mla",
                 *CALIB, "--no_wer"])
    assert not (work / "exp/gqa2").exists()
    before = (work / "exp/gqa1/conversion/model.pth").read_bytes()
    with pytest.raises(UserError, match="already holds config.yaml"):
        run_convert(work, monkeypatch, "exp/asr_conformer_mha", "exp/gqa1/conversion",
                    "--target", "gqa", "--no_wer")
    assert (work / "exp/gqa1/conversion/model.pth").read_bytes() == before


def test_the_command_line(work):
    result = subprocess.run(
        [sys.executable, "-m", "espnet_plugin.bin.convert_attention", "--asr_train_config",
         "exp/asr_conformer_mha/config.yaml", "--asr_model_file", "exp/asr_conformer_mha/model.pth",
         "--out_dir", "exp/cli/conversion", "--target", "mla", *CALIB, "--no_wer"],
        cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "encoder.blocks.0.mixer" in result.stdout and "cache per position, all" in result.stdout


def test_the_recipe_converts_then_fine_tunes_a_trained_model(work):
    """asr.sh --finetune_from: the conversion, then ESPnet's trainer on a config made from the
    trained model's config.yaml, which records keys ESPnet's own parser refuses in a --config."""
    source = yaml.safe_load((work / ASR_EXP / "config.yaml").read_text())
    assert {"required", "distributed", "version"} <= set(source)
    run_recipe(work, "--finetune_from", ASR_EXP, "--asr_tag", "tiny_mla_ft", "--convert_args",
               "--target mla --calib_utts 4 --no_wer", "--finetune_epochs", "1",
               "--stage", "5", "--stop_stage", "5")
    exp = work / "exp" / "asr_tiny_mla_ft"
    config = yaml.safe_load((exp / "config.yaml").read_text())
    assert config["decoder"] == "cached_transformer" and config["max_epoch"] == 1
    assert config["optim_conf"]["lr"] == pytest.approx(source["optim_conf"]["lr"] * 0.1)
    assert (exp / "valid.acc.ave.pth").is_file() and (exp / "1epoch.pth").is_file()
