"""Shallow fusion of a Transformer LM works with every decoder of the project and with dynamic
chunking: ESPnet's beam search scores each hypothesis with the LM too, and a strong LM weight
changes what is decoded (random weights, real speech)."""

import pytest
import soundfile
import torch
import yaml

import espnet_plugin  # noqa: F401  (registers the classes the configs name)
from conftest import LIBRISPEECH_MINI, REPO

CONF = REPO / "egs2" / "asterisk_en" / "asr1" / "conf"
CONFIGS = {
    "stock decoder (ConMamba)": CONF / "train_asr.yaml",
    "dynamic chunking": CONF / "tuning" / "train_asr_conmamba_dc_small.yaml",
    **{f"cached {kind}": CONF / "tuning" / f"train_asr_conformer_{kind}_small.yaml"
       for kind in ("mha", "mla", "gqa", "linear")},
}
TOKENS = ["<blank>", "<unk>", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'", "<space>", "<sos/eos>"]
FS = 16000

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save(folder, task, config: dict, extra: list[str]):
    """Build a model as training would and save its config.yaml and weights."""
    folder.mkdir(parents=True)
    (folder / "train.yaml").write_text(yaml.safe_dump(config))
    (folder / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    args = task.get_parser().parse_args(["--config", str(folder / "train.yaml"), "--token_list",
                                         str(folder / "tokens.txt"), "--token_type", "char", *extra])
    torch.manual_seed(0)
    model = task.build_model(args)
    args.token_list = TOKENS
    (folder / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), folder / "model.pth")
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from espnet2.tasks.lm import LMTask

    config = yaml.safe_load((CONF / "train_lm_tiny.yaml").read_text())
    return save(tmp_path_factory.mktemp("lm") / "lm", LMTask, config, [])


@pytest.fixture(scope="module")
def speech():
    flacs = sorted((LIBRISPEECH_MINI / "LibriSpeech").rglob("*.flac"))
    if not flacs:
        pytest.skip(f"no LibriSpeech sample at {LIBRISPEECH_MINI}")
    wave, rate = soundfile.read(flacs[0], dtype="float32")
    assert rate == FS
    return wave[: 2 * FS]


@pytest.mark.parametrize("name", CONFIGS)
def test_fusion_decodes_with_every_decoder(name, lm, speech, tmp_path):
    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.tasks.asr import ASRTask

    config = yaml.safe_load(CONFIGS[name].read_text())
    asr = save(tmp_path / "asr", ASRTask, config, ["--frontend_conf", f"fs={FS}"])

    def decode(lm_weight: float):
        speech2text = Speech2Text(
            asr_train_config=asr / "config.yaml", asr_model_file=asr / "model.pth",
            lm_train_config=lm / "config.yaml", lm_file=lm / "model.pth", lm_weight=lm_weight,
            beam_size=3, ctc_weight=0.3, maxlenratio=0.2)
        return speech2text, speech2text(speech)[0]

    fused, (text, _, _, hypothesis) = decode(0.5)
    assert "lm" in fused.beam_search.full_scorers
    assert set(hypothesis.scores) >= {"decoder", "ctc", "lm"}
    assert hypothesis.scores["lm"] != 0.0  # the LM scored the hypothesis
    _, (strongly_fused, *_) = decode(50.0)
    _, (unfused, *_) = decode(0.0)
    assert isinstance(text, str) and strongly_fused != unfused
