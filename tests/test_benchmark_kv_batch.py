"""benchmark_kv_batch on the small recipe's Conformer of each attention type (random weights built
by ESPnet's ASRTask from the configs), decoding real speech joined to 1 s utterances in batches.

The decoder cache bytes it measures at batch > 1 must equal both the attention variants' analytic
sizes and the bytes worked out here by hand from each config's options, the audio length and the
fixed number of steps; every attention type makes the same number of steps; the largest batch
within a budget follows the rule on a hand-made table; a budget the longest utterance alone
exceeds is refused in one line naming it; the figure is written.
"""

import json
import logging

import pytest
import soundfile
import yaml

from conftest import LIBRISPEECH_MINI, REPO
from espnet_plugin.benchmarks import kv_batch
from espnet_plugin.cli import UserError
from espnet_plugin.recipe.report_plots import throughput_and_memory
from test_profile_kv_cache import FLOAT32, build_model, encoder_frames, entry_numbers

CONFIGS = REPO / "egs2/asterisk_en/asr1/conf/tuning"
FS, SECONDS, TOKENS_PER_SECOND, BEAM, BATCH = 16000, 1.0, 5.0, 2, 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wav_scp(tmp_path_factory):
    """Two real LibriSpeech utterances, the shortest of the sample."""
    flacs = sorted((LIBRISPEECH_MINI / "LibriSpeech").rglob("*.flac"))
    if len(flacs) < 2:
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH_MINI}")
    flacs = sorted(flacs, key=lambda f: soundfile.info(f).frames)[:2]
    path = tmp_path_factory.mktemp("speech") / "wav.scp"
    path.write_text("".join(f"{f.stem} {f}\n" for f in flacs))
    return path


def benchmark(configs, wav_scp, out, *options):
    return kv_batch.main([
        "--asr_train_config", *map(str, configs), "--wav_scp", str(wav_scp),
        "--vocab_size", "30", "--beam_size", str(BEAM), "--ctc_weight", "0.3",
        "--tokens_per_second", str(TOKENS_PER_SECOND), "--output", str(out), *options,
    ])


def hand_cache_bytes(config: dict, utterances: int, steps: int, frames: int) -> int:
    """All layers: every hypothesis' self-attention cache of ``steps`` tokens (linear attention:
    its fixed state) and every utterance's cross-attention memory of ``frames`` frames."""
    decoder = config["decoder_conf"]
    d_model, heads = config["encoder_conf"]["output_size"], decoder["attention_heads"]
    kind = decoder.get("self_attention_type", "mha")
    if kind == "linear":
        head_dim = d_model // heads
        self_numbers = heads * (head_dim + 1) * head_dim
    else:
        self_numbers = steps * entry_numbers(kind, decoder.get("self_attention_conf", {}),
                                             d_model, heads, rotary=True)
    cross_numbers = frames * entry_numbers(decoder.get("src_attention_type", "mha"),
                                           decoder.get("src_attention_conf", {}), d_model, heads,
                                           rotary=False)
    per_layer = utterances * BEAM * self_numbers + utterances * cross_numbers
    return decoder["num_blocks"] * per_layer * FLOAT32


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "linear"])
def test_measured_cache_bytes_equal_analytic_and_hand_computed(tmp_path, wav_scp, variant):
    config = CONFIGS / f"train_asr_conformer_{variant}_small.yaml"
    report = benchmark([config], wav_scp, tmp_path / "out.json", "--seconds", str(SECONDS),
                       "--batch_sizes", str(BATCH))
    (row,) = report["models"][0]["rows"]
    steps = round(SECONDS * TOKENS_PER_SECOND)
    assert (row["batch_size"], row["steps"], row["tokens_per_utterance"]) == (BATCH, steps, steps)
    assert row["cache_equals_analytic"]
    assert row["decoder_cache_bytes"] == row["analytic_cache_bytes"]
    expected = hand_cache_bytes(yaml.safe_load(config.read_text()), BATCH, steps,
                                encoder_frames(round(SECONDS * FS)))
    assert row["decoder_cache_bytes"] == expected
    # What the search keeps holds the caches in use (and their spare room) and CTC's state.
    assert row["decoder_state_peak_bytes"] >= row["decoder_cache_bytes"]
    assert row["search_state_peak_bytes"] > row["decoder_state_peak_bytes"]
    assert row["peak_bytes"] == row["search_state_peak_bytes"]  # on a CPU
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["models"][0]["rows"][0]["decoder_cache_bytes"] == expected


def test_largest_batch_within_a_budget():
    rows = [{"batch_size": b, "peak_bytes": p}
            for b, p in [(1, 10), (2, 19), (4, 40), (8, 41), (16, 80)]]
    assert kv_batch.largest_batch_within(rows, 40) == 4
    assert kv_batch.largest_batch_within(rows, 41) == 8
    assert kv_batch.largest_batch_within(rows, 1000) == 16
    assert kv_batch.largest_batch_within(rows, 9) is None


def test_a_budget_the_longest_utterance_exceeds_names_it(tmp_path, wav_scp):
    config = CONFIGS / "train_asr_conformer_mha_small.yaml"
    longest = max(wav_scp.read_text().splitlines(),
                  key=lambda line: soundfile.info(line.split()[1]).frames)
    key, path = longest.split()
    seconds = soundfile.info(path).frames / FS
    with pytest.raises(UserError, match=rf"^--memory_budget_mb 0\.001: the longest utterance "
                                        rf"alone, {key} \({seconds:.1f} s\), takes .* MB"):
        benchmark([config], wav_scp, tmp_path / "out.json", "--batch_sizes", "2",
                  "--memory_budget_mb", "0.001")
    assert not (tmp_path / "out.json").exists()


def test_budget_and_figure_of_two_attention_types(tmp_path, wav_scp):
    configs = [CONFIGS / f"train_asr_conformer_{v}_small.yaml" for v in ("mha", "mla")]
    report = benchmark(configs, wav_scp, tmp_path / "out.json", "--seconds", str(SECONDS),
                       "--batch_sizes", "1", "2", "--memory_budget_mb", "1000",
                       "--plot", str(tmp_path / "batch.png"))
    for model in report["models"]:
        assert [r["batch_size"] for r in model["rows"]] == [1, 2]
        assert model["largest_batch_within_budget"] == 2
    mha, mla = (m["rows"][-1]["decoder_cache_bytes"] for m in report["models"])
    assert mla < mha
    assert (tmp_path / "batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_from_hand_made_rows(tmp_path):
    rows = [{"batch_size": b, "utterances_per_second": 2.0 * b ** 0.5, "peak_bytes": b * 2**20}
            for b in (1, 2, 4)]
    path = tmp_path / "kv.png"
    throughput_and_memory({"mha": rows, "mla": rows[:2]}, path, budget_mb=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_10_command_line_on_a_trained_model(tmp_path, wav_scp, caplog):
    """As asr.sh's stage 10 calls it: a model saved as training saves it, decoded with its own
    ending; the decoding options that do not apply (an LM) are ignored with a warning."""
    model_dir, _ = build_model(tmp_path / "model", CONFIGS / "train_asr_conformer_gqa_small.yaml")
    decode_config = tmp_path / "decode.yaml"
    decode_config.write_text("beam_size: 2\nctc_weight: 0.3\nmaxlenratio: 0.5\n")
    out = tmp_path / "profile" / "kv_batch.json"
    out.parent.mkdir()
    # at_level: whatever level (or logging.disable) the tests before this one left behind.
    with caplog.at_level(logging.WARNING):
        report = kv_batch.main([
            "--asr_train_config", str(model_dir / "config.yaml"),
            "--asr_model_file", str(model_dir / "model.pth"), "--inference_config",
            str(decode_config), "--lm_train_config", "lm/config.yaml", "--lm_file",
            "lm/model.pth", "--device", "cpu", "--wav_scp", str(wav_scp), "--fs", "16k",
            "--batch_sizes", "1", "2", "--output", str(out), "--beam_size", "3",
        ])
    assert "ignoring options this benchmark does not use: --lm_train_config" in caplog.text
    assert report["settings"]["beam_size"] == 3 and report["settings"]["weights"] == "trained"
    rows = report["models"][0]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["cache_equals_analytic"] for r in rows)
    # Batch 1 decodes the longer of the two utterances alone; batch 2 both.
    longest = max(wav_scp.read_text().splitlines(),
                  key=lambda line: soundfile.info(line.split()[1]).frames).split()[0]
    assert rows[0]["keys"] == [longest] and sorted(rows[1]["keys"]) == sorted(
        line.split()[0] for line in wav_scp.read_text().splitlines())
    assert json.loads(out.read_text())["models"][0]["largest_batch_within_budget"] is None
