"""The decoding program: batched decoding of the small recipe's real test prompts gives ESPnet's
own program's results, whatever the batch; batching rules; bad options; a batch that runs out of
GPU memory is split."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASR_EXP
from espnet_plugin.decoding import inference

DECODE_OPTIONS = ["--beam_size", "4", "--ctc_weight", "0.5", "--maxlenratio", "0.3",
                  "--nbest", "2"]


def decode(recipe: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    exp = recipe / ASR_EXP
    return subprocess.run(
        [sys.executable, "-m", "espnet_plugin.bin.asr_inference",
         "--asr_train_config", str(exp / "config.yaml"),
         "--asr_model_file", str(exp / "valid.acc.ave.pth"),
         "--data_path_and_name_and_type", f"{recipe / 'dump/raw/test/wav.scp'},speech,sound",
         "--output_dir", str(out), *DECODE_OPTIONS, *options],
        cwd=recipe, capture_output=True, text=True, timeout=900)


def table(path: Path) -> dict:
    return dict(line.split(maxsplit=1) for line in path.read_text().splitlines())


def scores(path: Path) -> dict:
    return {k: float(v.removeprefix("tensor(").rstrip(")")) for k, v in table(path).items()}


def test_batched_decoding_gives_espnets_results_in_any_batch(recipe, tmp_path):
    espnet = decode(recipe, tmp_path / "espnet", "--search", "espnet")
    assert espnet.returncode == 0, espnet.stderr[-3000:]
    for size in ("1", "3", "16"):
        ours = decode(recipe, tmp_path / size, "--batch_size", size)
        assert ours.returncode == 0, ours.stderr[-3000:]
        assert (tmp_path / size / "batches.jsonl").is_file()
        for n in ("1best_recog", "2best_recog"):
            expected, found = tmp_path / "espnet" / n, tmp_path / size / n
            assert table(found / "token_int") == table(expected / "token_int"), (size, n)
            assert table(found / "text") == table(expected / "text")
            for key, value in scores(expected / "score").items():
                assert scores(found / "score")[key] == pytest.approx(value, abs=1e-3, rel=1e-5)


@pytest.mark.parametrize("options, named", [(["--batch_size", "0"], "--batch_size"),
                                            (["--batch_frames", "-5"], "--batch_frames")])
def test_a_bad_batch_option_is_named(recipe, tmp_path, options, named):
    result = decode(recipe, tmp_path / "out", *options)
    assert result.returncode == 1
    assert named in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_batches_are_longest_first_and_within_both_limits():
    lengths = [("a", 100.0), ("b", 300.0), ("c", 200.0), ("d", 50.0), ("e", 250.0)]
    assert list(inference.batches(lengths, 2, 0)) == [["b", "e"], ["c", "a"], ["d"]]
    # 3 x 300 > 700: b and e (2 x 300), then c, a, d (3 x 200 = 600)
    assert list(inference.batches(lengths, 8, 700)) == [["b", "e"], ["c", "a", "d"]]
    # an utterance longer than the frame limit still goes, alone
    assert list(inference.batches(lengths, 8, 250)) == [["b"], ["e"], ["c"], ["a", "d"]]


def test_a_batch_out_of_gpu_memory_is_decoded_in_halves(monkeypatch):
    decoded = []

    def search(xs, lengths, maxlenratio, minlenratio, ctc_input):
        assert torch.equal(ctc_input[1], lengths + 1)  # each utterance's own CTC frames
        if len(xs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        decoded.append(len(xs))
        return [[f"hyp of {int(n)} frames"] for n in lengths]

    decoder = inference.BatchDecoder.__new__(inference.BatchDecoder)
    decoder.search = search
    decoder.speech2text = type("S2T", (), {"maxlenratio": 0.0, "minlenratio": 0.0})()
    monkeypatch.setattr(inference, "results_of", lambda s2t, nbest: nbest)
    keys = [f"u{i}" for i in range(5)]
    encoded = [(torch.zeros(10 + i, 4), torch.zeros(11 + i, 4)) for i in range(5)]
    results = dict(decoder._decode(keys, encoded))
    assert results == {f"u{i}": [f"hyp of {10 + i} frames"] for i in range(5)}
    assert decoded == [2, 1, 2]  # 5 runs out: 2, then 3 runs out: 1 and 2


def test_a_model_the_batched_search_cannot_decode_exactly_is_named():
    from types import SimpleNamespace

    from espnet2.asr.decoder.rnn_decoder import RNNDecoder

    search = SimpleNamespace(full_scorers={"decoder": RNNDecoder(10, 8)}, part_scorers={})
    found, why_not = inference.batched_search(SimpleNamespace(beam_search=search))
    assert found is None and "RNNDecoder" in why_not
    search = SimpleNamespace(full_scorers={"lm": object()}, part_scorers={})
    found, why_not = inference.batched_search(SimpleNamespace(beam_search=search))
    assert found is None and "scorer lm" in why_not
