"""The LibriSpeech-100 recipe on the LibriSpeech sample: data, formatting, BPE tokens, statistics
and the LM text and statistics (stages 1-4 and 6); the training commands asr.sh builds for one
and for four GPUs keep 128 utterances per update; LM inputs that cannot be used are named."""

import gzip
import re
import shlex

import pytest
import yaml

from conftest import LIBRISPEECH_MINI, REPO, copy_recipe, run_recipe

RECIPE = REPO / "egs2" / "librispeech_100" / "asr1"
SETS = ["--train_set", "dev_clean", "--valid_set", "test_clean", "--test_sets", "test_clean",
        "--nbpe", "30", "--speed_perturb_factors", "", "--max_wav_duration", "40", "--nj", "2"]
LM = ["--use_lm", "true", "--lm_config", "conf/tuning/train_lm_transformer_small.yaml"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The recipe after stages 1-4 and 6 on the sample, with a small LM corpus."""
    if not (LIBRISPEECH_MINI / "LibriSpeech").is_dir():
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH_MINI}")
    work = copy_recipe(RECIPE, tmp_path_factory.mktemp("librispeech") / "asr1")
    run_recipe(work, "--stage", "1", "--stop_stage", "1", *SETS, "--local_data_opts",
               f"--librispeech_dir {LIBRISPEECH_MINI} --splits dev-clean test-clean --combine")
    # An LM corpus: the transcripts' words in another order, one test sentence among them.
    words = " ".join(line.split(maxsplit=1)[1] for line in
                     (work / "data/dev_clean/text").read_text().splitlines()).split()
    test_sentence = (work / "data/test_clean/text").read_text().splitlines()[0].split(maxsplit=1)[1]
    lines = [" ".join(words[i : i + 12][::-1]) for i in range(0, len(words), 12)] * 50
    with gzip.open(work / "corpus.txt.gz", "wt") as f:
        f.write("\n".join([*lines, test_sentence]) + "\n")
    run_recipe(work, "--stage", "2", "--stop_stage", "4", *SETS, "--asr_config", "conf/train_asr.yaml")
    run_recipe(work, "--stage", "6", "--stop_stage", "6", *SETS, *LM,
               "--lm_train_text", "corpus.txt.gz")
    return work, len(lines)


def test_stages_1_to_4_and_6_on_the_sample(work):
    work, corpus_lines = work
    assert (work / "data/en_token_list/bpe_unigram30/bpe.model").is_file()
    assert len(list(work.glob("exp/asr_stats_raw_en_bpe30_*/train/feats_stats.npz"))) == 1
    lm_text = (work / "dump/raw/lm/train.txt").read_text().splitlines()
    transcripts = (work / "data/dev_clean/text").read_text().splitlines()
    # the training transcripts once, the corpus, and not the test sentence it held
    assert len(lm_text) == len(transcripts) + corpus_lines
    test_sentences = {line.split(maxsplit=1)[1] for line in
                      (work / "dump/raw/test_clean/text").read_text().splitlines()}
    assert not test_sentences & {line.split(maxsplit=1)[1] for line in lm_text}
    shapes = (work / "exp/lm_stats_en_bpe30/train/text_shape.bpe").read_text().splitlines()
    tokens = len((work / "data/en_token_list/bpe_unigram30/tokens.txt").read_text().splitlines())
    assert len(shapes) == len(lm_text) and all(line.endswith(f",{tokens}") for line in shapes)
    logs = list((work / "exp/lm_stats_en_bpe30/logdir").glob("stats.*.log"))
    assert len(logs) == 2  # collected in --nj jobs


def training_command(work, *options: str) -> list[str]:
    result = run_recipe(work, "--stage", "5", "--stop_stage", "5", *SETS, "--dry_run", "true",
                        *options)
    line = next(line for line in result.stdout.splitlines() if "the training command:" in line)
    return shlex.split(line.split("the training command: ", 1)[1])


def option(command: list[str], name: str, config: dict):
    """An option's last value on the command line, else the config's."""
    values = [command[i + 1] for i, word in enumerate(command) if word == f"--{name}"]
    return values[-1] if values else config.get(name)


@pytest.mark.parametrize("extra", [[], ["--utts_per_update", "128", "--utts_per_gpu", "16"]])
def test_conmamba_updates_on_128_utterances_with_one_or_four_gpus(work, extra):
    work, _ = work
    config = yaml.safe_load((work / "conf/train_asr.yaml").read_text())
    per_gpu = set()
    for ngpu in (1, 4):
        command = training_command(work, "--asr_config", "conf/train_asr.yaml", "--ngpu",
                                   str(ngpu), *extra)
        assert option(command, "batch_type", config) == "sorted"
        batch, accum = int(option(command, "batch_size", config)), int(option(command, "accum_grad", config))
        assert batch * accum == 128, (ngpu, batch, accum)
        per_gpu.add(batch // ngpu)
    assert per_gpu == ({16} if extra else {64, 16})


def test_attention_configs_keep_espnets_batch_on_any_gpu_count(work):
    work, _ = work
    config_file = "conf/tuning/train_asr_conformer_mha.yaml"
    config = yaml.safe_load((work / config_file).read_text())
    for ngpu in (1, 4):
        command = training_command(work, "--asr_config", config_file, "--ngpu", str(ngpu))
        bins = int(option(command, "batch_bins", config)) * int(option(command, "accum_grad", config))
        assert option(command, "batch_type", config) == "numel" and bins == 64_000_000


@pytest.mark.parametrize("content, message", [
    (None, r"missing .*nowhere.txt: it is made by you \(--lm_train_text\)"),
    (b"", r"no sentence in it \(the file is empty\)"),
    (b"SOME WORDS\n\x00\x01\x02 binary\n", r"bad.txt:2: a NUL byte: this is not a text file"),
    (b"\xff\xfe\x00W", r"not UTF-8 text"),
])
def test_lm_text_that_cannot_be_used_is_named(work, tmp_path, content, message):
    work, _ = work
    path = tmp_path / ("nowhere.txt" if content is None else "bad.txt")
    if content is not None:
        path.write_bytes(content)
    before = (work / "dump/raw/lm/train.txt").read_bytes()
    result = run_recipe(work, "--stage", "6", "--stop_stage", "6", *SETS, *LM,
                        "--lm_train_text", str(path), check=False)
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr[-2000:]
    assert (work / "dump/raw/lm/train.txt").read_bytes() == before  # nothing overwritten


def test_a_missing_bpe_model_is_named_at_stage_6(work, tmp_path):
    work, _ = work
    copy = copy_recipe(work, tmp_path / "asr1", ignore=())
    (copy / "data/en_token_list/bpe_unigram30/bpe.model").unlink()
    result = run_recipe(copy, "--stage", "6", "--stop_stage", "6", *SETS, *LM,
                        "--lm_train_text", "corpus.txt.gz", check=False)
    assert result.returncode != 0
    assert "bpe.model: it is made by stage 3 (the ASR's BPE model tokenizes the LM text" in result.stderr


def test_an_lm_of_other_tokens_or_none_is_refused_at_decoding(work, tmp_path):
    work, _ = work
    copy = copy_recipe(work, tmp_path / "asr1", ignore=())
    asr, lm = copy / "exp/asr_x", copy / "exp/lm_train_lm_transformer_small_en_bpe30"
    asr.mkdir(parents=True)
    (asr / "config.yaml").write_text(yaml.safe_dump({"token_list": ["<blank>", "A", "<sos/eos>"]}))
    (asr / "valid.acc.ave.pth").write_bytes(b"")
    decode = ["--stage", "8", "--stop_stage", "8", *SETS, *LM, "--asr_tag", "x"]
    missing = run_recipe(copy, *decode, check=False)
    assert missing.returncode != 0
    assert f"missing {lm.relative_to(copy)}/valid.loss.ave.pth: it is made by stage 7" in missing.stderr
    lm.mkdir(parents=True)
    (lm / "config.yaml").write_text(yaml.safe_dump({"token_list": ["<blank>", "B", "<sos/eos>"]}))
    (lm / "valid.loss.ave.pth").write_bytes(b"")
    other = run_recipe(copy, *decode, check=False)
    assert other.returncode != 0 and "have different token lists" in other.stderr
