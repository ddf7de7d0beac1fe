"""Decode a data set in batches of utterances: ESPnet's ``asr_inference`` with the plugin's
batched beam search (:mod:`espnet_plugin.decoding.beam_search`) in place of its own.

The model, its scorers and weights, tokenizer and preprocessing are ESPnet's ``Speech2Text``,
built from the same options; the outputs are ESPnet's files (``1best_recog/text``, ``token``,
``token_int``, ``score``, one folder per n-best). Utterances are sorted by length, longest first,
and grouped by count (``--batch_size``) and padded 10 ms frames (``--batch_frames``). Each is
encoded alone, so its encoder output, and therefore its n-best, does not depend on the batch (the
encoder is a few percent of decoding); the beam search decodes the batch at once. On a GPU a batch
that runs out of memory is split in halves and retried. ``<output_dir>/batches.jsonl`` records each
batch: utterances, frames, seconds and peak memory.

Models the batched search cannot decode exactly (another decoder than ESPnet's Transformer or the
plugin's cached one, a scorer that reads the encoder output, an n-gram) are decoded by ESPnet's own
program, one utterance at a time, after one warning that says why.
"""

import argparse
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import soundfile
import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.bin.asr_inference import Speech2Text, get_parser
from espnet2.fileio.datadir_writer import DatadirWriter
from espnet2.lm.abs_model import AbsLM
from espnet2.tasks.asr import ASRTask
from espnet2.torch_utils.set_all_random_seed import set_all_random_seed
from espnet2.train.dataset import ESPnetDataset

from espnet_plugin.asr_model import ctc_input
from espnet_plugin.benchmarks.kv_cache import PeakMemory
from espnet_plugin.cli import UserError
from espnet_plugin.compat import CTCPrefixScorer, Hypothesis, TooShortUttError, nets_module
from espnet_plugin.decoding.beam_search import BatchedBeamSearch
from espnet_plugin.nets.transformer_decoder import CachedTransformerDecoder, cached_from_stock

logger = logging.getLogger(__name__)
LengthBonus = nets_module("scorers.length_bonus").LengthBonus
FRAMES_PER_SECOND = 100  # what --batch_frames counts: 10 ms frames of input audio
PLUGIN_OPTIONS = ("--batch_frames", "--search")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("batched decoding (espnet_plugin)")
    group.add_argument("--batch_frames", type=int, default=0,
                       help="at most this many padded 10 ms input frames in a batch (batch size "
                            "x longest utterance); 0: no limit but --batch_size")
    group.add_argument("--search", choices=("batched", "espnet"), default="batched",
                       help="batched: the plugin's batched beam search where the model allows "
                            "it; espnet: ESPnet's own decoding program")
    return parser


def check_batching(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be 1 or more, got {args.batch_size}")
    if args.batch_frames < 0:
        raise UserError(f"--batch_frames must be 0 (no limit) or more, got {args.batch_frames}")


def batched_search(speech2text: Speech2Text) -> Tuple[Optional[BatchedBeamSearch], str]:
    """The batched search doing what ``speech2text``'s beam search does, or None and why not."""
    search = speech2text.beam_search
    if search is None or not hasattr(search, "full_scorers"):
        return None, "the model does not decode with ESPnet's attention/CTC beam search"
    decoder, scorers = None, {}
    for name, scorer in search.full_scorers.items():
        if name == "decoder":
            decoder = scorer
        elif isinstance(scorer, (AbsLM, LengthBonus)):
            scorers[name] = scorer
        else:
            return None, f"scorer {name} ({type(scorer).__name__}) may read the encoder output"
    ctc = None
    for name, scorer in search.part_scorers.items():
        if name != "ctc" or not isinstance(scorer, CTCPrefixScorer):
            return None, f"partial scorer {name} ({type(scorer).__name__}) cannot be batched"
        ctc = scorer.ctc
    if decoder is not None and not isinstance(decoder, CachedTransformerDecoder):
        if type(decoder) is not TransformerDecoder:
            return None, f"decoder {type(decoder).__name__} has no batched state"
        train_args = speech2text.asr_train_args
        try:
            decoder = cached_from_stock(decoder, train_args.decoder_conf or {},
                                        decoder.output_layer.out_features,
                                        decoder.decoders[0].size)
        except ValueError as err:
            return None, str(err)
    if search.pre_beam_score_key not in (None, "full"):
        return None, f"pre_beam_score_key {search.pre_beam_score_key} is not 'full'"
    return BatchedBeamSearch(
        decoder, ctc, scorers, search.weights, search.beam_size, search.n_vocab, search.sos,
        search.eos, pre_beam_ratio=search.pre_beam_size / search.beam_size,
        pre_beam_score_key=search.pre_beam_score_key, nbest=speech2text.nbest,
        normalize_length=search.normalize_length, token_list=search.token_list,
    ), ""


def results_of(speech2text: Speech2Text, hyps: List[Hypothesis]) -> list:
    """``Speech2Text``'s (text, tokens, token ids, hypothesis) of each hypothesis."""
    results = []
    for hyp in hyps[: speech2text.nbest]:
        token_int = [t for t in hyp.yseq[1:-1].tolist() if t != 0]
        token = speech2text.converter.ids2tokens(token_int)
        text = None if speech2text.tokenizer is None else speech2text.tokenizer.tokens2text(token)
        results.append((text, token, token_int, hyp))
    return results


def batches(lengths: Sequence[Tuple[str, float]], batch_size: int,
            batch_frames: int) -> Iterator[List[str]]:
    """Keys grouped longest first: at most ``batch_size`` of them and, with ``batch_frames``,
    at most that many padded frames (size x longest); a longer utterance goes alone."""
    batch: List[str] = []
    longest = 0.0
    for key, frames in sorted(lengths, key=lambda kv: -kv[1]):
        longest = max(longest, frames)
        if batch and (len(batch) == batch_size
                      or (batch_frames and (len(batch) + 1) * longest > batch_frames)):
            yield batch
            batch, longest = [], frames
        batch.append(key)
    if batch:
        yield batch


def input_frames(dataset: ESPnetDataset, path_name_type: Tuple[str, str, str],
                 keys: Sequence[str]) -> List[Tuple[str, float]]:
    """Each utterance's length in 10 ms frames, from the audio headers where the input is
    audio files (nothing is loaded), else from the loaded input."""
    path, name, kind = path_name_type
    if kind == "sound":
        from espnet_plugin.recipe.kaldi_data import read_table

        files = read_table(path, value_name="audio path", sorted_ids=False)
        infos = {key: soundfile.info(files[key]) for key in keys}
        return [(k, infos[k].frames * FRAMES_PER_SECOND / infos[k].samplerate) for k in keys]
    return [(key, float(len(dataset[key][1][name]))) for key in keys]


class BatchDecoder:
    """Encodes each utterance of a batch alone, pads the outputs and decodes them at once."""

    def __init__(self, speech2text: Speech2Text, search: BatchedBeamSearch,
                 audio: Callable[[str], torch.Tensor]):
        self.speech2text, self.search, self.audio = speech2text, search, audio
        self.peak = PeakMemory(str(speech2text.device))

    def encode(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The encoder output (frames, size) of utterance ``key`` alone, and what CTC scores of it
        (the same, or the full-rate output of ``ctc_dechunked``); None if too short."""
        speech = torch.as_tensor(self.audio(key))[None].to(
            device=self.speech2text.device, dtype=getattr(torch, self.speech2text.dtype))
        lengths = speech.new_full((1,), speech.size(1), dtype=torch.long)
        model = self.speech2text.asr_model
        try:
            enc, enc_lens = model.encode(speech, lengths)
        except TooShortUttError as err:
            logger.warning(f"utterance {key}: {err}")
            return None
        enc = enc[0] if isinstance(enc, tuple) else enc
        ctc_enc = ctc_input(model, enc, enc_lens)[0] if model.ctc is not None else enc
        return enc[0], ctc_enc[0]

    @torch.inference_mode()
    def __call__(self, keys: List[str]) -> Iterator[Tuple[str, list]]:
        """(key, results) of each utterance of ``keys``."""
        outputs = {key: self.encode(key) for key in keys}
        for key in [k for k, out in outputs.items() if out is None]:
            del outputs[key]
            hyp = Hypothesis(score=0.0, scores={}, states={}, yseq=[])
            yield key, [(" ", ["<space>"], [2], hyp)] * self.speech2text.nbest  # ESPnet's
        if outputs:
            yield from self._decode(list(outputs), list(outputs.values()))

    def _decode(self, keys: List[str], encoded: List[Tuple[torch.Tensor, torch.Tensor]]):
        try:
            xs, lengths = padded([e for e, _ in encoded])
            nbests = self.search(xs, lengths, self.speech2text.maxlenratio,
                                 self.speech2text.minlenratio, padded([c for _, c in encoded]))
        except torch.cuda.OutOfMemoryError:
            if len(keys) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(keys) // 2
            logger.warning(f"out of memory decoding {len(keys)} utterances; splitting in two")
            yield from self._decode(keys[:half], encoded[:half])
            yield from self._decode(keys[half:], encoded[half:])
            return
        for key, nbest in zip(keys, nbests):
            yield key, results_of(self.speech2text, nbest)


def padded(outputs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Utterances' outputs (frames, size) as one zero-padded batch, and their lengths."""
    return (torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True),
            torch.tensor([len(o) for o in outputs]))


def write_results(writer: DatadirWriter, key: str, results: list) -> None:
    """ESPnet's output files of one utterance."""
    for n, (text, token, token_int, hyp) in enumerate(results, 1):
        ibest = writer[f"{n}best_recog"]
        ibest["token"][key] = " ".join(token)
        ibest["token_int"][key] = " ".join(map(str, token_int))
        ibest["score"][key] = str(hyp.score)
        if text is not None:
            ibest["text"][key] = text


def build_speech2text(args: argparse.Namespace) -> Speech2Text:
    """ESPnet's ``Speech2Text`` from the program's options, as ESPnet's ``inference`` builds it
    (one utterance at a time inside: batching is this module's)."""
    accepted = inspect.signature(Speech2Text.__init__).parameters
    kwargs = {k: v for k, v in vars(args).items() if k in accepted}
    kwargs.update(device="cuda" if args.ngpu >= 1 else "cpu", batch_size=1)
    return Speech2Text.from_pretrained(model_tag=args.model_tag, **kwargs)


def decode(args: argparse.Namespace, speech2text: Speech2Text, search: BatchedBeamSearch) -> None:
    if len(args.data_path_and_name_and_type) != 1:
        raise UserError("batched decoding reads one input (--data_path_and_name_and_type "
                        f"speech); got {len(args.data_path_and_name_and_type)}")
    path_name_type = tuple(args.data_path_and_name_and_type[0])
    dataset = ESPnetDataset(
        [path_name_type], float_dtype=args.dtype,
        preprocess=ASRTask.build_preprocess_fn(speech2text.asr_train_args, False))
    keys = list(dataset.loader_dict[path_name_type[1]].keys())
    if args.key_file is not None:
        wanted = Path(args.key_file).read_text().split("\n")
        wanted = {line.split(maxsplit=1)[0] for line in wanted if line.strip()}
        keys = [key for key in keys if key in wanted]
    decoder = BatchDecoder(speech2text, search, lambda key: dataset[key][1][path_name_type[1]])
    log_path = Path(args.output_dir) / "batches.jsonl"
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    lengths = dict(input_frames(dataset, path_name_type, keys))
    with DatadirWriter(args.output_dir) as writer, log_path.open("w") as log:
        for batch in batches(list(lengths.items()), args.batch_size, args.batch_frames):
            decoder.peak.reset()
            start = time.perf_counter()
            for key, results in decoder(batch):
                write_results(writer, key, results)
            record = {"utterances": len(batch), "frames": max(lengths[k] for k in batch),
                      "audio_seconds": sum(lengths[k] for k in batch) / FRAMES_PER_SECOND,
                      "seconds": time.perf_counter() - start,
                      "peak_memory_bytes": decoder.peak.peak_bytes(),
                      "peak_memory_kind": decoder.peak.kind}
            log.write(json.dumps(record) + "\n")
            logger.info(f"decoded {len(batch)} utterances in {record['seconds']:.2f} s")


def main(argv: Sequence[str], espnet_main: Callable[[List[str]], None]) -> None:
    """Decode as ESPnet's ``asr_inference`` (``espnet_main``) does, in batches where the model
    allows."""
    parser = add_arguments(get_parser())
    args = parser.parse_args(argv)
    check_batching(args)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    espnet_argv = without_options(list(argv), PLUGIN_OPTIONS)
    if args.search == "espnet":
        return espnet_main(espnet_argv)
    set_all_random_seed(args.seed)
    speech2text = build_speech2text(args)
    search, why_not = batched_search(speech2text)
    if search is None:
        logger.warning(f"decoding one utterance at a time with ESPnet's beam search: {why_not}")
        # ESPnet 202511 decodes one utterance at a time only.
        return espnet_main(without_options(espnet_argv, ["--batch_size"]) + ["--batch_size", "1"])
    decode(args, speech2text, search)


def without_options(argv: List[str], options: Sequence[str]) -> List[str]:
    """``argv`` less each of ``options`` and its value (``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg.split("=", 1)[0] not in options:
            out.append(arg)
    return out
