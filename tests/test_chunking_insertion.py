"""convert_attention --target dynamic_chunking on a model of the small recipe's config built by
ESPnet's ASRTask: every trained weight is kept, the blocks before the router compute exactly what
the source computed, the router is a fresh one, and the checkpoint loads and decodes in ESPnet."""

import numpy as np
import pytest
import soundfile
import torch
import yaml

from conftest import REPO
from espnet_plugin.cli import UserError
from espnet_plugin.convert_attention import main as convert
from espnet_plugin.hooks import intercepted
from espnet_plugin.nets.encoders import ChunkingStage

CONFIG = REPO / "egs2/asterisk_en/asr1/conf/tuning/train_asr_conmamba_50fps_small.yaml"
RATE = 8000
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random-weight experiment of the 50 frames-a-second ConMamba and two utterances."""
    from espnet2.tasks.asr import ASRTask

    work = tmp_path_factory.mktemp("insert")
    tokens = work / "tokens.txt"
    tokens.write_text("\n".join(["<blank>", "<unk>", *"abcdefghijklmnopqrstuvwxyz ", "<sos/eos>"]))
    args = ASRTask.get_parser().parse_args([
        "--config", str(CONFIG), "--token_list", str(tokens), "--token_type", "char",
        "--frontend_conf", f"fs={RATE}"])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    args.token_list = tokens.read_text().splitlines()
    exp = work / "exp/asr_conmamba_50fps"
    exp.mkdir(parents=True)
    (exp / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), exp / "model.pth")
    rng = np.random.default_rng(0)
    data = work / "dev"
    data.mkdir()
    scp, text = [], []
    for i, seconds in enumerate((1.2, 0.9)):
        path = data / f"u{i}.wav"
        soundfile.write(path, rng.normal(0, 0.1, int(seconds * RATE)).astype("float32"), RATE)
        scp.append(f"u{i} {path}")
        text.append(f"u{i} a cab")
    (data / "wav.scp").write_text("\n".join(scp) + "\n")
    (data / "text").write_text("\n".join(text) + "\n")
    return work, exp


def insert(source, out, *options):
    work, exp = source
    return convert(["--asr_train_config", str(exp / "config.yaml"), "--asr_model_file",
                    str(exp / "model.pth"), "--out_dir", str(work / out), "--calib_data",
                    str(work / "dev/wav.scp"), "--target", "dynamic_chunking", *options])


def block_outputs(model, speech, count):
    """The outputs of the encoder's first ``count`` blocks on ``speech``."""
    outputs = []
    with torch.no_grad():
        for block in model.encoder.blocks[:count]:
            block.register_forward_hook(lambda m, a, out: outputs.append(out))
        model.encode(speech, torch.tensor([speech.size(1)]))
    return outputs


def test_the_router_is_inserted_and_everything_before_it_is_unchanged(source):
    from espnet2.tasks.asr import ASRTask

    work, exp = source
    report = insert(source, "converted", "--after_block", "1", "--target_ratio", "0.6",
                    "--min_keep_ratio", "0.4", "--beam_size", "2")
    config = yaml.safe_load((work / "converted/config.yaml").read_text())
    assert config["model"] == "espnet_aux"
    assert config["encoder_conf"]["dynamic_chunking"] == {
        "after_block": 1, "target_ratio": 0.6, "ratio_loss_weight": 0.03, "min_keep_ratio": 0.4,
        "output": "compressed"}
    original, _ = ASRTask.build_model_from_file(exp / "config.yaml", exp / "model.pth", "cpu")
    converted, _ = ASRTask.build_model_from_file(work / "converted/config.yaml",
                                                 work / "converted/model.pth", "cpu")
    before, after = original.state_dict(), converted.state_dict()
    assert sorted(after.keys() - before.keys()) == [
        "encoder.chunking.k_proj.weight", "encoder.chunking.q_proj.weight"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = ChunkingStage(144, after_block=1)  # a new router's weights
    assert all(torch.equal(after[f"encoder.chunking.{k}"], v)
               for k, v in fresh.state_dict().items())

    original.eval(), converted.eval()
    speech = torch.randn(1, 2 * RATE)
    for a, b in zip(block_outputs(original, speech, 1), block_outputs(converted, speech, 1),
                    strict=True):
        assert torch.equal(a, b)
    routed = []
    with torch.no_grad(), intercepted(converted.encoder.chunking, "chunk",
                                      lambda a, out: routed.append(out[2])):
        converted.encode(speech, torch.tensor([speech.size(1)]))
    assert routed[0].chunk_lengths.item() < routed[0].lengths.item()  # frames were dropped
    # ESPnet's Speech2Text decoded the calibration utterances with both checkpoints
    assert set(report["wer"]) == {"original", "converted"}
    assert report["target"] == "dynamic_chunking" and report["modules"] == []


@pytest.mark.parametrize("options, message", [
    ([], "needs --after_block"),
    (["--after_block", "4"], "--after_block 4: expected 1..3"),
    (["--after_block", "2", "--target_ratio", "1.5"], "target_ratio must be in"),
])
def test_bad_chunking_options_are_named_and_nothing_is_written(source, options, message):
    with pytest.raises(UserError, match=message):
        insert(source, "bad", *options, "--no_wer")
    assert not (source[0] / "bad").exists()


def test_a_chunked_model_gets_no_second_router(source):
    work, _ = source
    insert(source, "once", "--after_block", "2", "--no_wer")
    with pytest.raises(UserError, match="already has dynamic chunking"):
        convert(["--asr_train_config", str(work / "once/config.yaml"), "--asr_model_file",
                 str(work / "once/model.pth"), "--out_dir", str(work / "twice"), "--calib_data",
                 str(work / "dev/wav.scp"), "--target", "dynamic_chunking", "--after_block", "1",
                 "--no_wer"])
