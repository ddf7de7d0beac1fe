"""Dynamic chunking's ``output: ctc_dechunked`` under ``model: espnet_aux``: CTC scores the
dechunked, full-rate output and the decoder attends to the compressed one, in the training loss
(against torch's CTC loss on the full-rate frames), in ESPnet's Speech2Text (BatchBeamSearch) and
in the plugin's batched search, which give the same n-best."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from espnet_plugin.asr_model import FullRateCTC
from espnet_plugin.decoding.inference import BatchDecoder, batched_search
from espnet_plugin.hooks import intercepted

RATE = 8000
TOKENS = ["<blank>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", "<sos/eos>"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(output="ctc_dechunked"):
    return {
        "frontend_conf": {"n_fft": 256, "win_length": 200, "hop_length": 160, "n_mels": 20},
        "encoder": "conmamba",
        "encoder_conf": {"output_size": 32, "linear_units": 32, "num_blocks": 2,
                         "input_layer": "linear", "cnn_module_kernel": 3,
                         "dynamic_chunking": {"after_block": 1, "target_ratio": 0.5,
                                              "min_keep_ratio": 0.3, "output": output}},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1},
        "model": "espnet_aux",
        "model_conf": {"ctc_weight": 0.5},
    }


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A random-weight model with ctc_dechunked, saved as ESPnet saves one."""
    from espnet2.tasks.asr import ASRTask

    work = tmp_path_factory.mktemp("ctc_dechunked")
    (work / "train.yaml").write_text(yaml.safe_dump(config()))
    (work / "tokens.txt").write_text("\n".join(TOKENS))
    args = ASRTask.get_parser().parse_args([
        "--config", str(work / "train.yaml"), "--token_list", str(work / "tokens.txt"),
        "--token_type", "char", "--frontend_conf", f"fs={RATE}"])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    with torch.no_grad():  # a router that drops frames, as a trained one does
        model.encoder.chunking.q_proj.weight.normal_(0, 0.3)
    args.token_list = TOKENS
    (work / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    torch.save(model.state_dict(), work / "model.pth")
    return work, model


def speech_batch():
    generator = torch.Generator().manual_seed(1)
    speech = torch.randn(2, RATE, generator=generator)
    return speech, torch.tensor([RATE, 3 * RATE // 4])


def test_ctc_loss_is_on_full_rate_frames_and_the_decoder_on_compressed_ones(experiment):
    _, model = experiment
    assert isinstance(model.ctc, FullRateCTC)
    model.eval()
    speech, lengths = speech_batch()
    text = torch.randint(2, 28, (2, 5), generator=torch.Generator().manual_seed(2))
    text_lengths = torch.tensor([5, 3])
    memories, states = [], []
    with torch.no_grad(), \
            intercepted(model.decoder, "forward", lambda a, out: memories.append(a)), \
            intercepted(model.encoder.chunking, "chunk", lambda a, out: states.append(out[2])):
        _, stats, _ = model(speech, lengths, text, text_lengths)
    state = states[0]
    assert (state.chunk_lengths < state.lengths).all()  # the router dropped frames
    assert torch.equal(memories[0]["hlens"], state.chunk_lengths)  # the decoder: compressed
    # CTC: torch's loss on the dechunked output of the encoder's own modules, full rate
    encoder = model.encoder
    with torch.no_grad():
        inner = encoder.blocks[1](encoder.chunking.compress(state.hidden, state.valid)[0],
                                  state.chunk_mask)
        full = encoder.after_norm(encoder.chunking.dechunk(inner, state))
        log_probs = F.log_softmax(model.ctc.ctc_lo(full), dim=-1)
        expected = F.ctc_loss(log_probs.transpose(0, 1), text, state.lengths, text_lengths,
                              reduction="sum", zero_infinity=True) / 2
    assert full.size(1) == state.lengths.max() > state.chunk_lengths.max()
    assert stats["loss_ctc"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_reaches_the_router_through_ctc(experiment):
    _, model = experiment
    model.train()
    speech, lengths = speech_batch()
    text = torch.randint(2, 28, (2, 5), generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    loss_ctc = model.ctc(*model.encode(speech, lengths), text, torch.tensor([5, 3]))
    loss_ctc.backward()
    assert model.encoder.chunking.residual_proj.weight.grad.abs().sum() > 0  # dechunker's
    assert model.encoder.chunking.q_proj.weight.grad.abs().sum() > 0  # the router's


def test_ctc_refuses_what_the_encoder_did_not_output(experiment):
    _, model = experiment
    model.eval()
    speech, lengths = speech_batch()
    with torch.no_grad():
        enc, _ = model.encode(speech, lengths)
        with pytest.raises(RuntimeError, match="not the encoder's latest output"):
            model.ctc.log_softmax(enc.clone())


def test_espnet_and_the_batched_search_give_ctc_the_full_rate_output(experiment):
    from espnet2.bin.asr_inference import Speech2Text

    work, _ = experiment
    speech2text = Speech2Text(asr_train_config=work / "config.yaml",
                              asr_model_file=work / "model.pth", beam_size=3, ctc_weight=0.5,
                              nbest=2, maxlenratio=0.5)
    model = speech2text.asr_model
    rng = np.random.default_rng(3)
    audio = {f"u{i}": rng.normal(0, 1, n).astype("float32") for i, n in enumerate((RATE, 6000))}
    espnet, ctc_frames, compressed = {}, [], []
    with intercepted(model.ctc, "log_softmax", lambda a, out: ctc_frames.append(out.size(1))), \
            intercepted(model.encoder.chunking, "chunk",
                        lambda a, out: compressed.append((out[1].item(), a["x"].size(1)))):
        for key, samples in audio.items():
            espnet[key] = speech2text(samples)
    assert ctc_frames == [full for _, full in compressed]  # CTC saw every full-rate frame
    assert all(kept < full for kept, full in compressed)
    search, why_not = batched_search(speech2text)
    assert search is not None, why_not
    ours = dict(BatchDecoder(speech2text, search, lambda key: audio[key])(list(audio)))
    for key, results in espnet.items():
        assert len(ours[key]) == len(results) == 2
        for (_, _, token_int, hyp), (_, _, our_ints, our_hyp) in zip(results, ours[key]):
            assert our_ints == token_int
            assert float(our_hyp.score) == pytest.approx(float(hyp.score), abs=1e-3)
            assert float(our_hyp.scores["ctc"]) == pytest.approx(float(hyp.scores["ctc"]),
                                                                 abs=1e-3)


def test_a_model_without_full_rate_ctc_is_refused():
    from espnet_plugin.nets.encoders import ConMambaEncoder

    encoder = ConMambaEncoder(20, **{k: v for k, v in config()["encoder_conf"].items()})
    with pytest.raises(RuntimeError, match="needs model: espnet_aux"):
        encoder(torch.randn(1, 50, 20), torch.tensor([50]))
    with pytest.raises(ValueError, match="interctc_layer_idx cannot be used"):
        ConMambaEncoder(20, **config()["encoder_conf"], interctc_layer_idx=[1])
