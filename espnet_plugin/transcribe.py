"""Transcribe audio files of any rate and channel count with a trained model, in three lines:

    from espnet_plugin import Transcriber
    transcribe = Transcriber.from_pretrained("exp/asr_x/packed/asr_x.zip")   # or exp/asr_x
    print(transcribe("prompt.wav"))

The model is ESPnet's ``Speech2Text``, built from the model's files
(:mod:`espnet_plugin.packed`) and decoding options as the recipe's decoding program builds it
(:func:`espnet_plugin.decoding.inference.build_speech2text`), and decodes with the plugin's
batched search (:class:`~espnet_plugin.decoding.inference.BatchDecoder`) where the model allows,
else ESPnet's own. Audio is brought to the frontend's rate by stage 2's resampling and its channels
averaged. Audio longer than ``max_seconds`` is decoded in pieces:

* ``windows``: windows of ``max_seconds`` overlapping by ``overlap_seconds``; each word, placed in
  time by a CTC forced alignment of its window's hypothesis, is kept from the window whose share of
  the overlap holds its middle (the cut is the middle of each overlap);
* ``silence``: cut at the middle of the longest silence (frames 35 dB below the loudest) in the
  second half of each ``max_seconds``, or at ``max_seconds`` where there is none.

Word times come from the same alignment (``torchaudio.functional.forced_align``).
"""

import argparse
import contextlib
import math
import sys
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile
import torch

from espnet_plugin.cli import UserError
from espnet_plugin.packed import DEFAULT_WEIGHTS, model_files, resolved_config

LONG_AUDIO = ("windows", "silence")
SILENCE_DB = -35.0  # a frame this far below the loudest is silence
FRAME_SECONDS = 0.01


@dataclass
class Word:
    text: str
    start: float  # seconds from the start of the file
    end: float


@dataclass
class Transcript:
    """One file's transcript, or why it has none (``error``)."""

    key: str
    text: str = ""
    words: List[Word] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None


# ---- audio ----


def read_audio(path: Union[str, Path], fs: Optional[int], resample: bool) -> np.ndarray:
    """The file's samples, mono, at ``fs`` (resampled unless ``resample`` is False); a file that
    cannot be read, is empty or, with ``resample`` False, is at another rate is a UserError."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such audio file")
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:
        raise UserError(f"{path}: cannot read audio ({err})") from None
    if wave.shape[0] == 0:
        raise UserError(f"{path}: the audio file is empty (0 samples)")
    return to_model_rate(wave, rate, fs, resample, str(path))


def to_model_rate(wave: np.ndarray, rate: int, fs: Optional[int], resample: bool,
                  name: str) -> np.ndarray:
    """(frames, channels) at ``rate`` -> mono at ``fs``: stage 2's conversion."""
    from espnet_plugin.recipe.format_data import convert

    if fs is not None and rate != fs and not resample:
        raise UserError(f"{name}: {rate} Hz, but the model's frontend takes {fs} Hz "
                        "(--resample false)")
    return convert(wave, rate, rate if fs is None else fs, Fraction(1))[:, 0]


# ---- long audio ----


def window_spans(seconds: float, window: float, overlap: float) -> List[Tuple[float, float]]:
    """Windows of ``window`` s overlapping by ``overlap`` s covering [0, seconds]; the last one
    ends at ``seconds``."""
    if seconds <= window:
        return [(0.0, seconds)]
    step = window - overlap
    count = math.ceil((seconds - overlap) / step)
    starts = [min(i * step, seconds - window) for i in range(count)]
    return [(start, start + window) for start in starts]


def join_windows(windows: Sequence[Tuple[float, float, List[Word]]]) -> List[Word]:
    """The words of overlapping windows (start, end, words in file time), in time order: each
    window keeps the words whose middle lies between the middles of its overlaps with its
    neighbours."""
    joined = []
    for i, (start, end, words) in enumerate(windows):
        low = -math.inf if i == 0 else (start + windows[i - 1][1]) / 2
        high = math.inf if i == len(windows) - 1 else (windows[i + 1][0] + end) / 2
        joined += [w for w in words if low <= (w.start + w.end) / 2 < high]
    return joined


def silence_spans(wave: np.ndarray, fs: int, max_seconds: float) -> List[Tuple[float, float]]:
    """Consecutive pieces of at most ``max_seconds``, each cut at the middle of the longest run of
    silent 10 ms frames in the second half of its allowed length (at ``max_seconds`` without one)."""
    hop = int(fs * FRAME_SECONDS)
    frames = len(wave) // hop
    energy = (wave[: frames * hop].reshape(frames, hop).astype(np.float64) ** 2).mean(axis=1)
    db = 10 * np.log10(energy + 1e-12)
    silent = db < db.max() + SILENCE_DB
    seconds = len(wave) / fs
    limit = int(max_seconds / FRAME_SECONDS)
    spans, start = [], 0
    while seconds - start * FRAME_SECONDS > max_seconds:
        best, run_start, cut = 0, None, start + limit
        for i in range(start + limit // 2, min(start + limit, frames) + 1):
            if i < min(start + limit, frames) and silent[i]:
                run_start = i if run_start is None else run_start
            elif run_start is not None:
                if i - run_start > best:
                    best, cut = i - run_start, (run_start + i) // 2
                run_start = None
        spans.append((start * FRAME_SECONDS, cut * FRAME_SECONDS))
        start = cut
    spans.append((start * FRAME_SECONDS, seconds))
    return spans


# ---- decoding ----


class Transcriber:
    """A model that transcribes files or arrays (see the module's docstring)."""

    def __init__(self, speech2text, fs: Optional[int], *, long_audio: str = "windows",
                 max_seconds: float = 20.0, overlap_seconds: float = 4.0, resample: bool = True,
                 batch_size: int = 8):
        from espnet_plugin.decoding.inference import BatchDecoder, batched_search

        if long_audio not in LONG_AUDIO:
            raise UserError(f"--long_audio {long_audio!r}: expected one of {', '.join(LONG_AUDIO)}")
        if not 0 <= overlap_seconds < max_seconds:
            raise UserError(f"--overlap_seconds {overlap_seconds}: expected 0 or more and under "
                            f"--max_seconds {max_seconds}")
        if batch_size < 1:
            raise UserError(f"--batch_size must be 1 or more, got {batch_size}")
        self.speech2text, self.fs = speech2text, fs
        self.long_audio, self.max_seconds, self.overlap = long_audio, max_seconds, overlap_seconds
        self.resample, self.batch_size = resample, batch_size
        self.pieces: dict = {}
        search, _ = batched_search(speech2text)
        self.decoder = BatchDecoder(speech2text, search, self.pieces.__getitem__)

    @classmethod
    def from_pretrained(cls, model: Union[str, Path], *, unpack_dir: Optional[Path] = None,
                        model_file: str = DEFAULT_WEIGHTS, device: str = "cpu",
                        decode_args: Sequence[str] = (), **options) -> "Transcriber":
        """The model of a packed zip, an unpacked one or an experiment folder; ``decode_args``:
        ``asr_inference`` options on top of its ``decode.yaml`` (``["--beam_size", "1"]``)."""
        with contextlib.redirect_stdout(sys.stderr):  # ESPnet prints notices as it imports
            return cls._from_files(model_files(Path(model), unpack_dir, model_file), device,
                                   decode_args, options)

    @classmethod
    def _from_files(cls, files, device, decode_args, options) -> "Transcriber":
        import espnet_plugin  # noqa: F401  (registers the plugin's classes)
        from espnet2.bin.asr_inference import get_parser
        from espnet2.torch_utils.set_all_random_seed import set_all_random_seed

        from espnet_plugin.decoding.inference import build_speech2text
        from espnet_plugin.safeguards import model_rate

        configs = tempfile.TemporaryDirectory(prefix="espnet_plugin_config_")
        argv = ["--output_dir", configs.name, "--data_path_and_name_and_type", "unused,speech,sound",
                "--asr_train_config", str(resolved_config(files.asr_train_config, configs.name)),
                "--asr_model_file", str(files.asr_model_file),
                "--ngpu", "1" if device.startswith("cuda") else "0"]
        if files.decode_config is not None:
            argv += ["--config", str(files.decode_config)]
        if files.lm_file is not None:
            argv += ["--lm_train_config", str(resolved_config(files.lm_train_config, configs.name)),
                     "--lm_file", str(files.lm_file)]
        try:
            args = get_parser().parse_args(argv + list(decode_args))
        except SystemExit:
            raise UserError(f"decoding options {' '.join(decode_args)!r}: not ESPnet's "
                            "asr_inference options (its usage is above)") from None
        set_all_random_seed(args.seed)
        transcriber = cls(build_speech2text(args), model_rate(str(files.asr_train_config)),
                          **options)
        transcriber._configs = configs  # removed with the transcriber
        return transcriber

    def __call__(self, audio: Union[str, Path, np.ndarray], rate: Optional[int] = None) -> str:
        """The text of a file, or of samples (frames[, channels]) at ``rate``."""
        if isinstance(audio, (str, Path)):
            item = (str(audio), audio)
        else:
            wave = np.asarray(audio, dtype=np.float32)
            if rate is None:
                raise UserError("samples need their rate: transcribe(samples, rate)")
            item = ("samples", to_model_rate(wave.reshape(len(wave), -1), rate, self.fs,
                                             self.resample, "samples"))
        (result,) = self.transcribe([item])
        if result.error:
            raise UserError(result.error)
        return result.text

    def transcribe(self, items: Iterable[Tuple[str, Union[str, Path, np.ndarray]]],
                   words: bool = False, progress: bool = False) -> Iterator[Transcript]:
        """A transcript of each (key, file or mono samples at the model's rate), in order; a file
        that cannot be transcribed gets one with its ``error``. ``words``: with word times."""
        from tqdm import tqdm

        items = list(items)
        pending: List[Tuple[Transcript, np.ndarray, list]] = []
        for key, source in tqdm(items, disable=not progress or len(items) < 10, unit="file"):
            try:
                wave = source if isinstance(source, np.ndarray) else read_audio(
                    source, self.fs, self.resample)
            except UserError as err:
                yield from self._decode(pending, words)
                pending = []
                yield Transcript(key, error=str(err))
                continue
            transcript = Transcript(key, seconds=len(wave) / self.rate)
            pending.append((transcript, wave, self.spans(wave)))
            if sum(len(spans) for _, _, spans in pending) >= self.batch_size:
                yield from self._decode(pending, words)
                pending = []
        yield from self._decode(pending, words)

    @property
    def rate(self) -> int:
        return self.fs or 16000

    def spans(self, wave: np.ndarray) -> List[Tuple[float, float]]:
        """The pieces (start, end in seconds) ``wave`` is decoded in."""
        seconds = len(wave) / self.rate
        if seconds <= self.max_seconds:
            return [(0.0, seconds)]
        if self.long_audio == "windows":
            return window_spans(seconds, self.max_seconds, self.overlap)
        return silence_spans(wave, self.rate, self.max_seconds)

    @torch.no_grad()
    def _decode(self, pending, words: bool) -> Iterator[Transcript]:
        from espnet_plugin.decoding.inference import batches

        self.pieces.clear()
        lengths = []
        for n, (_, wave, spans) in enumerate(pending):
            for i, (start, end) in enumerate(spans):
                key = (n, i)
                self.pieces[key] = torch.from_numpy(np.ascontiguousarray(
                    wave[round(start * self.rate): round(end * self.rate)]))
                lengths.append((key, end - start))
        results = {}
        for batch in batches(lengths, self.batch_size, 0):
            results.update(self._decode_batch(batch))
        for n, (transcript, _, spans) in enumerate(pending):
            pieces = [results[(n, i)] for i in range(len(spans))]
            if len(spans) == 1:
                transcript.text = pieces[0][0] or ""
            if len(spans) > 1 or words:
                aligned = [[Word(w.text, w.start + start, w.end + start)
                            for w in self.align((n, i), pieces[i][2])]
                           for i, (start, _) in enumerate(spans)]
                if len(spans) > 1 and self.long_audio == "windows":
                    transcript.words = join_windows(
                        [(s, e, ws) for (s, e), ws in zip(spans, aligned)])
                    transcript.text = " ".join(w.text for w in transcript.words)
                else:
                    transcript.words = [w for ws in aligned for w in ws]
                if len(spans) > 1 and self.long_audio == "silence":
                    transcript.text = " ".join(w for text, *_ in pieces for w in (text or "").split())
            transcript.text = transcript.text.strip()
            yield transcript
        self.pieces.clear()

    def _decode_batch(self, keys: list) -> Iterator[Tuple[tuple, tuple]]:
        """(key, best (text, token, token_int, hyp)) of each piece of ``keys``."""
        if self.decoder.search is not None:
            for key, results in self.decoder(keys):
                yield key, results[0]
            return
        for key in keys:  # ESPnet's own search, one piece at a time
            yield key, self.speech2text(self.pieces[key])[0]

    def align(self, key, token_int: List[int]) -> List[Word]:
        """The words of a piece's hypothesis, placed in the piece by a CTC forced alignment."""
        import torchaudio

        from espnet_plugin.asr_model import frame_log_softmax

        encoded = self.decoder.encode(key)
        token_int = [t for t in token_int if t != 0]
        if encoded is None or not token_int:
            return []
        _, ctc_frames = encoded  # what CTC scores: the full-rate output of ctc_dechunked
        log_probs = frame_log_softmax(self.speech2text.asr_model.ctc,
                                      ctc_frames[None]).float().cpu()
        seconds_per_frame = len(self.pieces[key]) / self.rate / log_probs.size(1)
        try:
            labels, scores = torchaudio.functional.forced_align(
                log_probs, torch.tensor([token_int], dtype=torch.int32), blank=0)
        except RuntimeError:  # more tokens than the piece has frames for
            return []
        spans = torchaudio.functional.merge_tokens(labels[0], scores[0].exp())
        tokens = self.speech2text.converter.ids2tokens(token_int)
        found, current = [], []
        for token, span in zip(tokens, spans):
            if token == "<space>" or (token.startswith("\u2581") and current):
                found.append(current)
                current = []
            if token != "<space>":
                current.append((token, span))
        found.append(current)
        tokenizer = self.speech2text.tokenizer
        return [Word(tokenizer.tokens2text([t for t, _ in word]).strip(),
                     word[0][1].start * seconds_per_frame, word[-1][1].end * seconds_per_frame)
                for word in found if word]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`Transcriber` and its loading, shared by the commands that use it."""
    parser.add_argument("--model", required=True, type=Path,
                        help="a packed model (.zip), an unpacked one or an experiment folder")
    parser.add_argument("--model_file", default=DEFAULT_WEIGHTS,
                        help="the weights in an experiment folder")
    parser.add_argument("--unpack_dir", type=Path,
                        help="where a zip is unpacked (default: a cache folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8, help="pieces decoded at once")
    parser.add_argument("--resample", choices=("true", "false"), default="true",
                        help="false: refuse audio at another rate than the model's")
    parser.add_argument("--long_audio", choices=LONG_AUDIO, default="windows",
                        help="how audio longer than --max_seconds is decoded")
    parser.add_argument("--max_seconds", type=float, default=20.0,
                        help="longer audio is decoded in pieces of at most this length")
    parser.add_argument("--overlap_seconds", type=float, default=4.0,
                        help="windows: the overlap of consecutive windows")


def from_arguments(args: argparse.Namespace, decode_args: Sequence[str], **overrides) -> Transcriber:
    options = dict(long_audio=args.long_audio, max_seconds=args.max_seconds,
                   overlap_seconds=args.overlap_seconds, resample=args.resample == "true",
                   batch_size=args.batch_size)
    options.update(overrides)
    return Transcriber.from_pretrained(args.model, unpack_dir=args.unpack_dir,
                                       model_file=args.model_file, device=args.device,
                                       decode_args=decode_args, **options)
