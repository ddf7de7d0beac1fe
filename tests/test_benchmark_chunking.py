"""The chunking benchmark decodes real speech end to end with tiny models; its JSON is consistent
with itself and with frame counts taken from ESPnet's own encode (no timing is asserted)."""

import json
import math

import numpy as np
import pytest
import soundfile
import torch
import yaml
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin.benchmarks.chunking import main

TOKENS = ["<blank>", "<unk>", *"abcdefghijklmnop", "<sos/eos>"]
ENCODER = {
    "output_size": 16, "linear_units": 32, "num_blocks": 3, "cnn_module_kernel": 5,
    "mamba_conf": {"d_state": 4},
}
CHUNKING = {"after_block": 2, "target_ratio": 0.5, "output": "compressed", "min_keep_ratio": 0.25}
TINY = {
    "frontend_conf": {"n_fft": 512, "win_length": 400, "hop_length": 160},
    "encoder": "conmamba",
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1},
    "model": "espnet_aux",
    "model_conf": {"ctc_weight": 0.3},
}


def training_config(folder, name, chunking):
    path = folder / f"{name}.yaml"
    encoder_conf = {**ENCODER, **({"dynamic_chunking": chunking} if chunking else {})}
    path.write_text(yaml.safe_dump({**TINY, "encoder_conf": encoder_conf}))
    return path


def saved_model(folder, name, chunking, seed):
    """What ESPnet training leaves: a complete config.yaml and a state_dict (random weights)."""
    args = ASRTask.get_parser().parse_args(
        ["--config", str(training_config(folder, name, chunking)), "--token_type", "char"]
    )
    args.token_list = TOKENS
    torch.manual_seed(seed)
    model = ASRTask.build_model(args)
    config, weights = folder / f"{name}_config.yaml", folder / f"{name}.pth"
    config.write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), weights)
    return config, weights


@pytest.fixture
def wav_scp(librispeech_mini, tmp_path):
    """The two shortest utterances of the sample."""
    flacs = sorted(librispeech_mini.rglob("*.flac"), key=lambda f: soundfile.info(f).frames)[:2]
    path = tmp_path / "wav.scp"
    path.write_text("".join(f"{f.stem} {f}\n" for f in flacs))
    return path


def encoded_lengths(config, weights, wav_scp) -> list[int]:
    """Encoder output lengths per utterance from ESPnet's Speech2Text model and encode()."""
    model = Speech2Text(asr_train_config=config, asr_model_file=weights).asr_model
    lengths = []
    for line in wav_scp.read_text().splitlines():
        wave, _ = soundfile.read(line.split()[1], dtype="float32")
        speech = torch.from_numpy(wave)[None]
        with torch.no_grad():
            _, olens = model.encode(speech, torch.tensor([speech.size(1)]))
        lengths.append(int(olens[0]))
    return lengths


def test_trained_model_and_baseline_report_consistent_times_and_compression(tmp_path, wav_scp):
    config, weights = saved_model(tmp_path, "chunked", CHUNKING, seed=0)
    baseline_config, baseline_weights = saved_model(tmp_path, "baseline", None, seed=1)
    output = tmp_path / "bench.json"
    main(["--asr_train_config", str(config), "--asr_model_file", str(weights),
          "--baseline_asr_train_config", str(baseline_config),
          "--baseline_asr_model_file", str(baseline_weights), "--wav_scp", str(wav_scp),
          "--tokens_per_second", "2", "--beam_size", "2", "--repeats", "1", "--threads", "1",
          "--output", str(output)])
    report = json.loads(output.read_text())

    # Kept frames: the chunked model's output lengths; all frames: those of a model built
    # without the chunking stage (the same weights otherwise), both through ESPnet's encode.
    kept = encoded_lengths(config, weights, wav_scp)
    unchunked_config = tmp_path / "unchunked_config.yaml"
    saved = yaml.safe_load(config.read_text())
    del saved["encoder_conf"]["dynamic_chunking"]
    unchunked_config.write_text(yaml.safe_dump(saved))
    state = {k: v for k, v in torch.load(weights).items() if ".chunking." not in k}
    torch.save(state, tmp_path / "unchunked.pth")
    frames = encoded_lengths(unchunked_config, tmp_path / "unchunked.pth", wav_scp)
    assert [u["kept"] for u in report["utterances"]] == kept
    assert [u["frames"] for u in report["utterances"]] == frames
    assert report["compression"] == {"kept": sum(kept), "frames": sum(frames),
                                     "ratio": sum(kept) / sum(frames)}
    assert 0.25 <= report["compression"]["ratio"] <= 1.0  # min_keep_ratio holds

    assert report["model"]["beam_search"] == "BatchBeamSearch"
    (run,) = report["runs"]
    names = {"chunked", "bypassed", "baseline"}
    for key in ("encoder_ms", "decode_ms"):
        for name in names:
            total = sum(r[key][name] for r in run["utterances"])
            assert math.isclose(run["totals"][key][name], total)
        for name in names - {"chunked"}:
            ratio = run["totals"][key][name] / run["totals"][key]["chunked"]
            assert math.isclose(run["speedup"][key[: -len("_ms")]][name], ratio)
    for u, r in zip(report["utterances"], run["utterances"]):
        assert u["steps"] == max(1, round(u["seconds"] * 2))
        assert r["tokens"] == {name: u["steps"] for name in names}
    parts = ("subsampling", "before_router", "router_and_rest", "after_router")
    for name in ("chunked", "bypassed"):
        for part in parts:
            total = sum(r["encoder_parts_ms"][name][part] for r in run["utterances"])
            assert math.isclose(run["totals"]["encoder_parts_ms"][name][part], total)
        for r in run["utterances"]:  # the hooked parts take time; the rest is what remains
            assert all(r["encoder_parts_ms"][name][part] > 0 for part in parts if part != "router_and_rest")


def test_random_weights_from_a_training_config(tmp_path, wav_scp):
    output = tmp_path / "bench.json"
    main(["--asr_train_config", str(training_config(tmp_path, "train", CHUNKING)),
          "--vocab_size", "30", "--wav_scp", str(wav_scp), "--max_utterances", "1",
          "--beam_size", "2", "--repeats", "1", "--threads", "1", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["model"]["weights"] == "random"
    (utt,) = report["utterances"]
    assert utt["steps"] == max(1, round(utt["seconds"] * 3))  # the default for random weights
    assert report["runs"][0]["utterances"][0]["tokens"]["chunked"] == utt["steps"]


def test_a_model_whose_ctc_reads_the_dechunked_output_is_timed_all_ways(tmp_path, wav_scp):
    """``output: ctc_dechunked``: bypassed, CTC scores the encoder's (full-rate) output."""
    config, weights = saved_model(tmp_path, "ctcfull", {**CHUNKING, "output": "ctc_dechunked"}, 0)
    output = tmp_path / "bench.json"
    main(["--asr_train_config", str(config), "--asr_model_file", str(weights),
          "--wav_scp", str(wav_scp), "--max_utterances", "1", "--tokens_per_second", "2",
          "--beam_size", "2", "--repeats", "1", "--threads", "1", "--output", str(output)])
    run = json.loads(output.read_text())["runs"][0]["utterances"][0]
    steps = run["tokens"]["chunked"]
    assert run["tokens"] == {"chunked": steps, "bypassed": steps}


def test_a_model_without_chunking_is_refused(tmp_path, wav_scp):
    with pytest.raises(ValueError, match="no dynamic chunking stage"):
        main(["--asr_train_config", str(training_config(tmp_path, "plain", None)),
              "--vocab_size", "30", "--wav_scp", str(wav_scp), "--output",
              str(tmp_path / "x.json")])


def test_audio_at_another_rate_than_fs_is_refused(tmp_path, wav_scp):
    with pytest.raises(ValueError, match=r"is 16000 Hz .* expected 8000 Hz mono \(--fs\)"):
        main(["--asr_train_config", str(training_config(tmp_path, "train", CHUNKING)),
              "--vocab_size", "30", "--wav_scp", str(wav_scp), "--fs", "8000",
              "--output", str(tmp_path / "x.json")])
