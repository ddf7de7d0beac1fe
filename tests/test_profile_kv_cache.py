"""profile_kv_cache on real models and real speech: models built by ESPnet's ASRTask from the small
attention-variant configs (random weights, saved as training saves them), decoding LibriSpeech
utterances (or espeak-ng speech when the sample is absent) through ESPnet's Speech2Text.
<sos/eos> is suppressed in the output layer, so every decode keeps a full beam to the maximum
length and the frames and tokens at the last step follow by hand from the audio length.

The cache bytes it measures must equal the ones computed here by hand from each config's options;
MLA and GQA keep the fraction of MHA's cache that their options give; linear attention's state
does not grow with the number of decoded tokens; a stock decoder, which keeps no key/value cache,
is profiled for time and memory with its cache left missing; dynamic chunking's kept frames are
counted.
"""

import json
import shutil
import subprocess

import pytest
import soundfile
import torch
import yaml
from torchaudio.functional import resample

import espnet_plugin  # noqa: F401
from conftest import LIBRISPEECH_MINI, REPO
from espnet_plugin.benchmarks import kv_cache as profile_kv_cache

CONFIGS = REPO / "egs2/asterisk_en/asr1/conf/tuning"
TOKENS = ["<blank>", "<unk>", *"abcdefghijklmnopqrstuvwxyz'", " ", "<sos/eos>"]
FLOAT32 = 4
FS = 16000
HOP = 80  # the small configs' frontend hop (samples)
MAXLENRATIO = 0.3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wav_scp(tmp_path_factory):
    """Kaldi wav.scp of two real utterances of different lengths, 16 kHz."""
    folder = tmp_path_factory.mktemp("speech")
    flacs = sorted((LIBRISPEECH_MINI / "LibriSpeech" / "test-clean").rglob("*.flac"))
    if len(flacs) >= 2:
        durations = {path: soundfile.info(path).duration for path in flacs}
        paths = sorted(durations, key=durations.get)[:2]  # the two shortest
    elif shutil.which("espeak-ng"):
        paths = []
        sentences = ["press one for sales", "please enter your account number and the pound key"]
        for index, sentence in enumerate(sentences):
            spoken = folder / f"espeak{index}.wav"
            subprocess.run(["espeak-ng", "-w", str(spoken), sentence], check=True)
            audio, rate = soundfile.read(spoken, dtype="float32")
            paths.append(folder / f"utt{index}.wav")
            soundfile.write(paths[-1], resample(torch.from_numpy(audio), rate, FS).numpy(), FS)
    else:
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH_MINI} and no espeak-ng")
    scp = folder / "wav.scp"
    scp.write_text("".join(f"utt{i} {path}\n" for i, path in enumerate(paths)))
    return scp


def build_model(folder, config):
    """Build a model from ``config`` with ESPnet's parser and ASRTask.build_model, and save its
    config.yaml and weights the way training does."""
    from espnet2.tasks.asr import ASRTask

    folder.mkdir(parents=True)
    tokens = folder / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    args = ASRTask.get_parser().parse_args(
        ["--config", str(config), "--token_list", str(tokens), "--token_type", "char",
         "--frontend_conf", f"fs={FS}"]
    )
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    with torch.no_grad():  # <sos/eos> never wins: every decode runs to the maximum length
        model.decoder.output_layer.bias[len(TOKENS) - 1] = -1e4
    (folder / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), folder / "model.pth")
    return folder, yaml.safe_load(config.read_text())


def profile(model_dir, wav_scp, out_dir):
    return profile_kv_cache.main([
        "--asr_train_config", str(model_dir / "config.yaml"),
        "--asr_model_file", str(model_dir / "model.pth"),
        "--data_path_and_name_and_type", f"{wav_scp},speech,sound",
        "--output_dir", str(out_dir),
        "--beam_size", "3",
        "--ctc_weight", "0.3",
        "--maxlenratio", str(MAXLENRATIO),
        "--warmup", "0",
    ])


def encoder_frames(samples: int) -> int:
    """Frames after the STFT (centred, hop 80) and conv2d subsampling (two 3x3 stride-2 convs)."""
    frames = samples // HOP + 1
    for _ in range(2):
        frames = (frames - 3) // 2 + 1
    return frames


def entry_numbers(kind: str, options: dict, d_model: int, heads: int, rotary: bool) -> int:
    """Numbers a softmax attention caches per token, by hand from its YAML options."""
    if kind == "mha":
        return 2 * d_model
    if kind == "gqa":
        return 2 * options["n_kv_heads"] * d_model // heads
    assert kind == "mla"
    return options["kv_latent_dim"] + (options["rope_dim"] if rotary else 0)


@pytest.fixture(scope="module")
def profiles(tmp_path_factory, wav_scp):
    """decode_stats.json of the small Conformer of each attention type, with its config."""
    results = {}
    for variant in ("mha", "gqa", "mla", "linear"):
        work = tmp_path_factory.mktemp(variant)
        config = CONFIGS / f"train_asr_conformer_{variant}_small.yaml"
        model_dir, config = build_model(work / "model", config)
        out = work / "decode" / "test"
        returned = profile(model_dir, wav_scp, out)
        written = json.loads((out / "decode_stats.json").read_text())
        assert written == json.loads(json.dumps(returned))
        for key in ("rtf", "decode_ms_per_utterance", "peak_memory_bytes", "parameters"):
            assert isinstance(written[key], (int, float)) and written[key] > 0, key
        results[variant] = (written, config)
    return results


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "linear"])
def test_measured_cache_equals_the_bytes_computed_from_the_config(profiles, variant, wav_scp):
    stats, config = profiles[variant]
    decoder = config["decoder_conf"]
    d_model, heads = config["encoder_conf"]["output_size"], decoder["attention_heads"]
    layers, head_dim = decoder["num_blocks"], d_model // heads
    samples = [soundfile.info(line.split()[1]).frames for line in wav_scp.read_text().splitlines()]
    assert [u["frames"] for u in stats["per_utterance"]] == [encoder_frames(n) for n in samples]
    assert [u["audio_seconds"] for u in stats["per_utterance"]] == [n / FS for n in samples]
    assert stats["rtf"] == pytest.approx(
        sum(u["decode_seconds"] for u in stats["per_utterance"]) / (sum(samples) / FS)
    )
    cross_numbers = entry_numbers(
        decoder["src_attention_type"], decoder.get("src_attention_conf"), d_model, heads, False
    )
    for u in stats["per_utterance"]:
        # a full beam; the last step scores prefixes of maxlen = int(maxlenratio * frames)
        assert u["hypotheses"] == 3 and u["tokens"] == int(MAXLENRATIO * u["frames"])
        assert 0 < u["search_seconds"] < u["decode_seconds"]
        if variant == "linear":
            self_bytes = layers * heads * head_dim * (head_dim + 1) * FLOAT32
        else:
            numbers = entry_numbers(
                variant, decoder.get("self_attention_conf"), d_model, heads, True
            )
            self_bytes = layers * u["tokens"] * numbers * FLOAT32
        cross_bytes = layers * u["frames"] * cross_numbers * FLOAT32
        assert u["measured"] == {
            "self_per_hypothesis": self_bytes,
            "self_beam": u["hypotheses"] * self_bytes,
            "cross_per_hypothesis": cross_bytes,
            "cross_beam": cross_bytes,  # one memory for the whole beam
        }
        assert u["measured"] == u["analytic"] and u["measured_equals_analytic"]
        mha_beam = layers * 2 * d_model * FLOAT32 * (u["hypotheses"] * u["tokens"] + u["frames"])
        beam = u["hypotheses"] * self_bytes + cross_bytes
        assert u["beam_bytes"] == beam and u["ratio_to_mha"] == pytest.approx(beam / mha_beam)
    cache = stats["kv_cache"]
    largest = max(stats["per_utterance"], key=lambda u: u["beam_bytes"])
    assert cache["largest_beam_bytes"] == largest["beam_bytes"]
    beams = [u["beam_bytes"] for u in stats["per_utterance"]]
    assert cache["beam_bytes_per_utterance"] == pytest.approx(sum(beams) / len(beams))
    assert cache["measured_equals_analytic"]


def test_mla_and_gqa_ratios_follow_from_their_options(profiles):
    for variant in ("mla", "gqa", "mha"):
        stats, config = profiles[variant]
        conf = config["decoder_conf"]
        d_model, heads = config["encoder_conf"]["output_size"], conf["attention_heads"]
        if variant == "gqa":
            self_ratio = conf["self_attention_conf"]["n_kv_heads"] / heads
            cross_ratio = conf["src_attention_conf"]["n_kv_heads"] / heads
        elif variant == "mla":
            options = conf["self_attention_conf"]
            self_ratio = (options["kv_latent_dim"] + options["rope_dim"]) / (2 * d_model)
            cross_ratio = conf["src_attention_conf"]["kv_latent_dim"] / (2 * d_model)
        else:
            self_ratio = cross_ratio = 1.0
        layers = conf["num_blocks"]
        mha_per_token = layers * 2 * d_model * FLOAT32
        assert stats["kv_cache"]["self_bytes_per_token"] == self_ratio * mha_per_token
        assert stats["kv_cache"]["cross_bytes_per_frame"] == cross_ratio * mha_per_token
        assert stats["kv_cache"]["ratio_to_mha_analytic"] == pytest.approx(self_ratio)
        if variant != "mha":
            assert self_ratio == 0.25 and cross_ratio == 0.25  # what the configs promise
        for u in stats["per_utterance"]:  # self and cross both a quarter: the beam too
            assert u["ratio_to_mha"] == pytest.approx(self_ratio)


def test_linear_attention_state_does_not_grow_with_length(profiles):
    stats, _ = profiles["linear"]
    tokens = [u["tokens"] for u in stats["per_utterance"]]
    per_hypothesis = {u["measured"]["self_per_hypothesis"] for u in stats["per_utterance"]}
    assert tokens[0] != tokens[1] and len(per_hypothesis) == 1
    assert stats["kv_cache"]["self_bytes_per_token"] == 0
    assert stats["kv_cache"]["self_fixed_bytes"] > 0


def test_a_stock_decoder_is_timed_and_has_no_cache(tmp_path, wav_scp):
    stock = REPO / "egs2/asterisk_en/asr1/conf/train_asr_tiny.yaml"  # decoder: transformer
    model_dir, _ = build_model(tmp_path / "model", stock)
    stats = profile(model_dir, wav_scp, tmp_path / "out")
    assert stats["kv_cache"] is None and stats["chunking"] is None
    assert stats["utterances"] == 2 and stats["rtf"] > 0
    assert "while decoding" in stats["peak_memory_kind"]
    from espnet2.tasks.asr import ASRTask

    model, _ = ASRTask.build_model_from_file(model_dir / "config.yaml", model_dir / "model.pth")
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())


def test_dynamic_chunking_counts_the_kept_frames(tmp_path, wav_scp):
    config = REPO / "egs2/asterisk_en/asr1/conf/tuning/train_asr_conmamba_dc_small.yaml"
    model_dir, _ = build_model(tmp_path / "model", config)
    stats = profile(model_dir, wav_scp, tmp_path / "out")
    chunking = stats["chunking"]
    assert 0 < chunking["kept_frames"] <= chunking["frames"]
    assert chunking["ratio"] == chunking["kept_frames"] / chunking["frames"]
    min_keep = yaml.safe_load(config.read_text())["encoder_conf"]["dynamic_chunking"].get(
        "min_keep_ratio", 0.25)
    assert chunking["kept_frames"] >= min_keep * chunking["frames"]


def test_decoding_options_come_from_the_inference_config(tmp_path, wav_scp):
    config = CONFIGS / "train_asr_conformer_mha_small.yaml"
    model_dir, _ = build_model(tmp_path / "model", config)
    decode = tmp_path / "decode.yaml"
    decode.write_text(yaml.safe_dump({"beam_size": 2, "ctc_weight": 0.4, "maxlenratio": 0.2}))
    stats = profile_kv_cache.main([
        "--asr_train_config", str(model_dir / "config.yaml"),
        "--asr_model_file", str(model_dir / "model.pth"),
        "--data_path_and_name_and_type", f"{wav_scp},speech,sound",
        "--output_dir", str(tmp_path / "out"), "--inference_config", str(decode),
        "--beam_size", "1", "--warmup", "0",
    ])
    settings = stats["settings"]
    assert (settings["beam_size"], settings["ctc_weight"], settings["maxlenratio"]) == (1, 0.4, 0.2)
    assert {u["hypotheses"] for u in stats["per_utterance"]} == {1}
