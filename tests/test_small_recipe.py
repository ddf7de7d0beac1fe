"""The small real-speech recipe end to end with a tiny ConMamba, then what a user does with its
model: reload the saved config (registration round trip), decode, pack; train with two CPU
processes (DDP, gloo); resume an interrupted training; train dynamic chunking on BPE units.

The recipe runs once per session on real recorded prompts that `apt-get download` fetches
(cached in pytest's cache dir, so a re-run does not download again).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import soundfile
import yaml

from conftest import ASR_EXP, DECODE, TINY, run_recipe, stats_dir


def test_every_stage_leaves_its_outputs(recipe):
    for dset in ("train", "dev", "test"):
        for name in ("wav.scp", "text", "utt2spk", "spk2utt"):
            assert (recipe / "data" / dset / name).stat().st_size > 0
    for dset in ("train_sp", "dev", "test"):
        assert (recipe / "dump" / "raw" / dset / "utt2num_samples").is_file()
    tokens = (recipe / "data/en_token_list/char/tokens.txt").read_text().split()
    assert tokens[:2] == ["<blank>", "<unk>"] and tokens[-1] == "<sos/eos>"
    assert {"A", "Z", "<space>"} <= set(tokens)
    assert (stats_dir(recipe) / "train/feats_stats.npz").is_file()
    assert (recipe / ASR_EXP / "valid.acc.ave.pth").is_file()
    assert len(list((recipe / "exp" / "logs").glob("asr.sh.*.log"))) >= 1
    report = (recipe / "exp/report/RESULTS.md").read_text()
    assert "test" in report
    # Stage 10's batched decodes (asr.sh's default --profile_batch_sizes "1 8"), in the report.
    batches = json.loads((recipe / ASR_EXP / DECODE / "test/profile/kv_batch.json").read_text())
    rows = batches["models"][0]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 8]
    assert all(r["cache_equals_analytic"] and r["utterances_per_second"] > 0 for r in rows)
    assert "utt/s at batch" in report
    assert (recipe / "exp/report/batch_throughput.png").is_file()


def test_conmamba_training_loss_goes_down_on_real_speech(recipe):
    log = (recipe / ASR_EXP / "train.log").read_text()
    losses = [float(m) for m in re.findall(r"\d+epoch results: \[train\].*? loss=([0-9.]+)", log)]
    assert len(losses) == 2, losses
    assert losses[1] < 0.9 * losses[0], f"training loss per epoch: {losses}"


def test_wer_file_parses_and_matches_the_hypotheses(recipe):
    dset = "test"
    decode = recipe / ASR_EXP / DECODE / dset
    result = json.loads((decode / "score_word" / "result.json").read_text())
    ref = dict(line.split(" ", 1) for line in (recipe / "dump/raw" / dset / "text").read_text().splitlines())
    hyp_ids = [line.split(" ", 1)[0] for line in (decode / "text").read_text().splitlines()]
    assert sorted(hyp_ids) == sorted(ref), "every test utterance is decoded exactly once"
    n_ref_words = sum(len(words.split()) for words in ref.values())
    counts = {k: v for k, v in result.items() if k in ("substitutions", "deletions", "insertions")}
    assert len(counts) == 3, result
    errors = sum(counts.values())
    assert result["error_rate"] == pytest.approx(100.0 * errors / n_ref_words, abs=0.01)


def test_saved_config_reloads_the_plugin_encoder_and_decodes(recipe, monkeypatch):
    """Registration round trip: YAML name -> training -> config.yaml -> rebuilt model -> decode.
    (A saved config holds paths relative to the recipe, where ESPnet's programs run.)"""
    monkeypatch.chdir(recipe)
    import espnet_plugin  # noqa: F401
    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.tasks.asr import ASRTask

    from espnet_plugin.nets.encoders import ConMambaEncoder

    exp = recipe / ASR_EXP
    assert re.search(r"^encoder: conmamba$", (exp / "config.yaml").read_text(), re.M)
    model, _ = ASRTask.build_model_from_file(exp / "config.yaml", exp / "valid.acc.ave.pth", "cpu")
    assert isinstance(model.encoder, ConMambaEncoder)

    wav = (recipe / "dump/raw/test/wav.scp").read_text().splitlines()[0].split(maxsplit=1)[1]
    speech, rate = soundfile.read(wav, dtype="float32")
    assert rate == 8000
    decoder = Speech2Text(asr_train_config=exp / "config.yaml", asr_model_file=exp / "valid.acc.ave.pth",
                          beam_size=2, ctc_weight=0.3, maxlenratio=0.1)
    text = decoder(speech)[0][0]
    assert isinstance(text, str)

    # ESPnet's pack (with the files the config refers to) rebuilds the same model elsewhere.
    packed = recipe / "packed.zip"
    subprocess.run([sys.executable, "-m", "espnet2.bin.pack", "asr",
                    "--asr_train_config", str(exp / "config.yaml"),
                    "--asr_model_file", str(exp / "valid.acc.ave.pth"),
                    "--option", str((stats_dir(recipe) / "train/feats_stats.npz").relative_to(recipe)),
                    "--outpath", str(packed)], check=True, cwd=recipe, capture_output=True)
    unpacked = recipe.parent / "unpacked"
    with zipfile.ZipFile(packed) as archive:
        archive.extractall(unpacked)
    monkeypatch.chdir(unpacked)
    config = next(unpacked.rglob("config.yaml"))
    weights = next(unpacked.rglob("*.pth"))
    reloaded = Speech2Text(asr_train_config=config, asr_model_file=weights, beam_size=2, ctc_weight=0.3,
                           maxlenratio=0.1)
    assert reloaded(speech)[0][0] == text


def test_distributed_training_with_two_cpu_processes(recipe):
    args = ["--stage", "5", "--stop_stage", "5", "--asr_config", TINY, "--asr_tag", "ddp",
            "--launcher", "torchrun", "--nproc_per_node", "2", "--asr_args", "--max_epoch 1"]
    result = run_recipe(recipe, *args, check=False)
    log = recipe / "exp/asr_ddp/train.log"
    if result.returncode and "terminate called without an active exception" in log.read_text():
        # Seen once in 5 runs with espnet 202611 / torch 2.14: a rank aborted as the training
        # ended. The same command resumes from the checkpoint, as a user would re-run it.
        result = run_recipe(recipe, *args, check=False)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    log = log.read_text()
    assert ":0/2]" in log, "rank 0 of a world of 2 wrote the log"
    assert (recipe / "exp/asr_ddp/1epoch.pth").is_file()


def test_a_killed_training_resumes_without_losing_checkpoints(recipe):
    """The training is killed (SIGKILL, the whole run.sh) once its first epoch is saved; the same
    command again resumes from the checkpoint and keeps the first epoch's files."""
    args = ["--stage", "5", "--stop_stage", "5", "--asr_config", TINY, "--asr_tag", "resume"]
    exp = recipe / "exp/asr_resume"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    training = subprocess.Popen(["bash", "run.sh", *args], cwd=recipe, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.time() + 900
    while not (exp / "1epoch.pth").exists() and training.poll() is None:
        assert time.time() < deadline, "the first epoch did not finish in time"
        time.sleep(1)
    os.killpg(training.pid, signal.SIGKILL)
    training.wait()
    assert not (exp / "valid.acc.ave.pth").exists(), "killed after the training had finished"
    first = (exp / "1epoch.pth").stat().st_mtime_ns
    run_recipe(recipe, *args)
    log = (exp / "train.log").read_text()
    assert "resumed" in log.lower() and "2epoch" in log
    assert (exp / "2epoch.pth").is_file() and (exp / "valid.acc.ave.pth").is_file()
    assert (exp / "1epoch.pth").stat().st_mtime_ns == first


def test_audio_is_real_speech(recipe):
    """The corpus is recorded speech: 8 kHz, and the utterances are seconds long, not silence."""
    line = (recipe / "data/train/wav.scp").read_text().splitlines()[0]
    audio, rate = soundfile.read(line.split(maxsplit=1)[1])
    assert rate == 8000 and len(audio) > rate * 0.3 and abs(audio).max() > 0.05


def test_language_model_stages_train_an_lm_that_fuses_into_decoding(recipe, monkeypatch):
    run_recipe(recipe, "--stage", "6", "--stop_stage", "7", "--asr_config", TINY, "--use_lm", "true",
        "--lm_config", "conf/train_lm_tiny.yaml")
    lm_exp = recipe / "exp/lm_train_lm_tiny_en_char"
    assert "2epoch results" in (lm_exp / "train.log").read_text()

    from espnet2.bin.asr_inference import Speech2Text

    monkeypatch.chdir(recipe)
    exp = recipe / ASR_EXP
    wav = (recipe / "dump/raw/test/wav.scp").read_text().splitlines()[0].split(maxsplit=1)[1]
    speech, _ = soundfile.read(wav, dtype="float32")
    fused = Speech2Text(asr_train_config=exp / "config.yaml", asr_model_file=exp / "valid.acc.ave.pth",
                        lm_train_config=lm_exp / "config.yaml", lm_file=lm_exp / "valid.loss.ave.pth",
                        lm_weight=0.3, beam_size=2, ctc_weight=0.3, maxlenratio=0.1)
    assert "lm" in fused.beam_search.full_scorers
    assert isinstance(fused(speech)[0][0], str)


def test_dynamic_chunking_learns_to_keep_half_the_frames_on_real_speech(recipe, tmp_path):
    """The tiny ConMamba with H-Net chunking after its first block, on BPE units (sentencepiece),
    the encoder output left compressed: the router starts with almost no boundaries and the
    ratio loss (H-Net's weight 0.03) brings the share of boundary frames to around the target 0.5."""
    config = yaml.safe_load((recipe / TINY).read_text())
    config["model"] = "espnet_aux"
    config["encoder_conf"]["dynamic_chunking"] = {
        "after_block": 1, "target_ratio": 0.5, "ratio_loss_weight": 0.03, "output": "compressed",
    }
    config["max_epoch"] = 6
    (tmp_path / "dc.yaml").write_text(yaml.safe_dump(config))
    run_recipe(recipe, "--stage", "3", "--stop_stage", "5", "--token_type", "bpe", "--nbpe", "150",
        "--asr_config", str(tmp_path / "dc.yaml"), "--asr_tag", "dc")
    assert (recipe / "data/en_token_list/bpe_unigram150/bpe.model").is_file()
    log = (recipe / "exp/asr_dc/train.log").read_text()
    ratios = [float(r) for r in re.findall(
        r"\d+epoch results: \[train\].*?encoder\.chunking\.boundary_ratio=([0-9.]+)", log)]
    assert len(ratios) == 6, ratios
    # The ASR loss, through the kept frames' straight-through confidence, pulls the share back and
    # forth around the target: where it settles is the mean of the last epochs.
    settled = sum(ratios[-3:]) / 3
    assert abs(settled - 0.5) < 0.5 * abs(ratios[0] - 0.5), f"boundary share per epoch: {ratios}"
