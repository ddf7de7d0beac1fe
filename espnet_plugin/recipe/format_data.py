"""Recipe formatting step: a prepared data dir -> ``dump/raw/<set>``, what ESPnet training reads.

Decodes every audio file once, in ``--nj`` processes, so that a file that is unreadable (a FLAC
cut short included), empty or shorter than ``--min_audio_dur`` is found here, by
utterance id and path, and not hours later in training or decoding: the step fails with the list,
or drops them with a warning under ``--bad_audio drop``. Audio at another rate than ``--fs``, or
with several channels, is brought to ``--fs`` and mono once, into ``<dst>/audio/converted/``
(``--resample false`` refuses another rate instead, listing it): a model hears every set at the
rate it was trained at, where a 16 kHz file in an 8 kHz set would otherwise be decoded as
8 kHz speech. Files already at ``--fs`` and mono are listed as they are, not copied. Adds
``utt2num_samples``, drops utterances outside the duration limits or with empty transcripts, and
adds speed-perturbed copies when asked: the Kaldi/ESPnet recipe augmentation, with
``sp<factor>-`` prefixed utterance and speaker ids and the perturbed audio written once to
``<dst>/audio/sp<factor>/`` so training only reads files. Conversion and perturbation are one
resampling (torchaudio's), made from the original file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import humanfriendly
import numpy as np
import soundfile
import torch
import torchaudio

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import (
    DataDir,
    DataDirExistsError,
    add_overwrite_option,
    conflicts,
    read_data_dir,
    write_data_dir,
)


def parse_factors(spec: str) -> list[Fraction]:
    """``"0.9 1.0 1.1"`` -> exact ratios; 1 keeps the original utterances."""
    try:
        factors = [Fraction(token) for token in spec.split()]
    except ValueError as err:
        raise UserError(f"--speed_perturb_factors {spec!r}: {err}") from err
    if not factors or any(f <= 0 for f in factors) or len(set(factors)) != len(factors):
        raise UserError(
            f"--speed_perturb_factors {spec!r}: expected distinct positive numbers "
            "like '0.9 1.0 1.1'"
        )
    return factors


def perturbation_name(factor: Fraction) -> str:
    """``sp0.9``: prefix of perturbed ids (``sp0.9-<id>``) and name of their audio folder."""
    return f"sp{float(factor):g}"


def converted_length(num_samples: int, rate: int, fs: int, factor: Fraction) -> int:
    """Samples of ``num_samples`` at ``rate`` brought to ``fs`` and sped up by ``factor``:
    ceil(num_samples * fs / (rate * factor)), as torchaudio's resampling gives."""
    return -(-num_samples * fs * factor.denominator // (rate * factor.numerator))


def convert(wave: np.ndarray, rate: int, fs: int, factor: Fraction) -> np.ndarray:
    """``wave`` (frames, channels) at ``rate`` -> mono at ``fs``, ``factor`` times faster.

    Speeding up is reading the samples as if recorded at ``factor`` times the rate (like sox
    ``speed``; pitch moves with it, as in Kaldi and ESPnet), so both are one resampling from
    ``rate * factor`` to ``fs``. Channels are averaged.
    """
    signal = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1, dtype=np.float32)))
    orig, new = rate * factor.numerator, fs * factor.denominator
    if orig != new:
        signal = torchaudio.functional.resample(signal, orig, new)
    return signal.numpy()[:, None]


class AudioCopy(NamedTuple):
    """One audio file written by this step (converted, perturbed or both): made from ``source``
    (at ``source_rate``), ``num_samples`` long at ``samplerate``."""

    source: str
    target: str
    factor: Fraction
    num_samples: int
    samplerate: int
    source_rate: int

    def exists(self) -> bool:
        """Whether ``target`` already holds a copy of the expected length and rate."""
        try:
            info = soundfile.info(self.target)
        except RuntimeError:  # absent or unreadable
            return False
        return info.frames == self.num_samples and info.samplerate == self.samplerate


def write_copy(copy: AudioCopy) -> None:
    """Write one copy as 16-bit mono FLAC, atomically."""
    wave, rate = soundfile.read(copy.source, dtype="float32", always_2d=True)
    out = np.clip(convert(wave, rate, copy.samplerate, copy.factor), -1.0, 1.0)
    tmp = f"{copy.target}.partial"
    soundfile.write(tmp, out, copy.samplerate, format="FLAC", subtype="PCM_16")
    os.replace(tmp, copy.target)


def parse_rate(spec: str) -> int:
    """``--fs``: ``8k``, ``16000`` -> samples per second (ESPnet's notation)."""
    try:
        rate = int(humanfriendly.parse_size(spec))
    except humanfriendly.InvalidSize as err:
        raise UserError(f"--fs {spec!r}: {err}") from err
    if rate <= 0:
        raise UserError(f"--fs {spec!r}: expected a positive rate like 8k or 16000")
    return rate


def _single_thread() -> None:
    # One file's resampling is too small to share out: threads cost more than they give
    # (3x slower with 2 threads on a 2-core machine); --nj processes parallelise instead.
    torch.set_num_threads(1)


@contextmanager
def worker_pool(nj: int):
    """``map`` over ``nj`` single-threaded processes, or in this process with one thread."""
    if nj > 1:
        with ProcessPoolExecutor(nj, initializer=_single_thread) as pool:
            yield lambda fn, items: pool.map(fn, items, chunksize=16)
        return
    threads = torch.get_num_threads()
    _single_thread()
    try:
        yield map
    finally:
        torch.set_num_threads(threads)


BAD_AUDIO = ("fail", "drop")


class AudioCheck(NamedTuple):
    """One audio file decoded whole: its length, rate and channels, or why it cannot be used."""

    num_samples: int
    samplerate: int
    problem: str | None
    channels: int = 1


def check_audio(path: str) -> AudioCheck:
    """Decode ``path`` completely: its header alone hides a file cut short (a FLAC copy killed
    midway has an intact header; only its decoder finds the missing frames)."""
    try:
        with soundfile.SoundFile(path) as f:
            rate, channels = f.samplerate, f.channels
            decoded = len(f.read(dtype="float32", always_2d=True))
    except (RuntimeError, OSError) as err:  # soundfile.LibsndfileError: missing, corrupt, odd
        return AudioCheck(0, 0, f"cannot read audio file {path}: {err}")
    if decoded == 0:
        return AudioCheck(0, rate, f"{path} is empty (0 samples)")
    return AudioCheck(decoded, rate, None, channels)


def check_all_audio(wav_scp: dict[str, str], nj: int) -> dict[str, AudioCheck]:
    """Every file of ``wav_scp`` decoded in ``nj`` processes, with progress in the log."""
    utts = list(wav_scp)
    checks = {}
    logging.info(f"decoding {len(utts)} audio files to check them ({nj} jobs)")
    step = max(1, len(utts) // 10)
    with worker_pool(nj) as pool_map:
        for done, (utt, check) in enumerate(
            zip(utts, pool_map(check_audio, [wav_scp[u] for u in utts])), 1
        ):
            checks[utt] = check
            if done % step == 0 or done == len(utts):
                logging.info(f"  checked {done}/{len(utts)} files")
    return checks


def describe(check: AudioCheck) -> str:
    """``44100 Hz, 2 channels``: what a file is, as the log and the errors name it."""
    return f"{check.samplerate} Hz" + (f", {check.channels} channels" if check.channels > 1 else "")


def listing(lines: list[str]) -> str:
    """The first 20 of ``lines``, one an indented line, and how many more there are."""
    more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
    return "\n  ".join(lines[:20]) + more


def refuse_other_rates(src: Path, wav_scp: dict[str, str], checks: dict[str, AudioCheck],
                       fs: int) -> None:
    """``--resample false``: a UserError listing every utterance whose audio is not at ``fs``."""
    wrong = [f"utterance '{utt}': {wav_scp[utt]} is {check.samplerate} Hz"
             for utt, check in checks.items() if not check.problem and check.samplerate != fs]
    if wrong:
        raise UserError(f"{src}/wav.scp: {len(wrong)} of {len(checks)} audio files are not at "
                        f"--fs {fs} Hz (--resample true converts them):\n  {listing(wrong)}")


def select(
    src: Path, dst: Path, min_dur: float, max_dur: float, factors: list[Fraction],
    min_audio_dur: float = 0.0, bad_audio: str = "fail", nj: int = 1,
    fs: int | None = None, resample: bool = True,
) -> tuple[DataDir, list[AudioCopy], list[str]]:
    """The output tables, originals and ``sp<factor>-`` copies within the duration limits, the
    files to write that they refer to (converted to ``fs`` and mono, perturbed), and one line per
    converted utterance; every audio file is decoded to check it (see the module docstring).
    ``fs`` None keeps each file's own rate.
    """
    data = read_data_dir(src, allow_empty_text=True)
    empty = [utt for utt in data.utts if not data.text[utt].strip()]
    if empty:
        logging.info(f"dropped {len(empty)} utterances with an empty transcript: {empty}")
    checks = check_all_audio({u: data.wav_scp[u] for u in data.utts if u not in empty}, nj)
    for utt, check in checks.items():
        if check.problem is None and check.num_samples < min_audio_dur * check.samplerate:
            checks[utt] = check._replace(problem=(
                f"{data.wav_scp[utt]} is {check.num_samples / check.samplerate:.3f} s long, "
                f"shorter than --min_audio_dur {min_audio_dur} s"))
    bad = [f"utterance '{utt}': {check.problem}" for utt, check in checks.items() if check.problem]
    if bad:
        if bad_audio == "fail":
            raise UserError(
                f"{src}/wav.scp: {len(bad)} of {len(checks)} audio files cannot be used "
                f"(--bad_audio drop leaves them out):\n  {listing(bad)}"
            )
        logging.warning(f"{src}/wav.scp: dropped {len(bad)} unusable audio files:\n  "
                        f"{listing(bad)}")
    if fs is not None and not resample:
        refuse_other_rates(src, data.wav_scp, checks, fs)
    converted = [f"{utt} {data.wav_scp[utt]} {describe(check)}" for utt, check in checks.items()
                 if not check.problem and (check.channels > 1 or fs not in (None, check.samplerate))]
    out = DataDir(wav_scp={}, text={}, utt2spk={}, utt2num_samples={})
    copies, too_short, too_long = [], [], []
    for factor in factors:
        prefix = "" if factor == 1 else f"{perturbation_name(factor)}-"
        audio_dir = (dst / "audio" / ("converted" if factor == 1 else perturbation_name(factor))
                     ).resolve()
        for utt, check in checks.items():
            if check.problem:
                continue
            rate = fs or check.samplerate
            new_utt = prefix + utt
            num_samples = converted_length(check.num_samples, check.samplerate, rate, factor)
            duration = num_samples / rate
            if duration < min_dur or duration > max_dur:
                (too_short if duration < min_dur else too_long).append(new_utt)
                continue
            source = data.wav_scp[utt]
            if factor == 1 and check.samplerate == rate and check.channels == 1:
                out.wav_scp[new_utt] = source  # as it is: no copy
            else:
                target = str(audio_dir / f"{utt}.flac")
                copies.append(AudioCopy(source, target, factor, num_samples, rate,
                                        check.samplerate))
                out.wav_scp[new_utt] = target
            out.text[new_utt] = data.text[utt]
            out.utt2spk[new_utt] = prefix + data.utt2spk[utt]
            out.utt2num_samples[new_utt] = num_samples
    for what, dropped in (
        (f"shorter than --min_dur {min_dur} s", too_short),
        (f"longer than --max_dur {max_dur} s", too_long),
    ):
        if dropped:
            logging.info(f"dropped {len(dropped)} utterances {what}: {dropped}")
    if converted:
        logging.info(f"converting {len(converted)} utterances to {fs or 'their own rate'}"
                     f"{' Hz' if fs else ''} mono (utterance, file, what it is):\n  "
                     + "\n  ".join(converted))
    return out, copies, converted


def format_data(
    src: str | Path,
    dst: str | Path,
    min_dur: float = 0.0,
    max_dur: float = math.inf,
    speed_perturb_factors: list[Fraction] | None = None,
    overwrite: bool = False,
    nj: int = 1,
    min_audio_dur: float = 0.0,
    bad_audio: str = "fail",
    fs: int | None = None,
    resample: bool = True,
) -> DataDir:
    """Write the formatted (converted, perturbed) copy of ``src`` to ``dst``; returns what was
    written. ``<dst>/converted`` lists the utterances brought to ``fs`` and mono (utterance,
    original file, its rate and channels); it is absent when none was.

    Everything that would change is checked before anything is written: a different existing
    output is refused (unless ``overwrite``), an identical one is left untouched.
    """
    src, dst = Path(src), Path(dst)
    if not 0 <= min_dur < max_dur:
        raise UserError(f"--min_dur {min_dur} / --max_dur {max_dur}: need 0 <= min < max")
    if src.resolve() == dst.resolve():
        raise UserError(f"--dst {dst} must differ from --src {src}")
    if nj < 1:
        raise UserError(f"--nj {nj}: need at least 1 process")
    if bad_audio not in BAD_AUDIO:
        raise UserError(f"--bad_audio {bad_audio!r}: expected one of {', '.join(BAD_AUDIO)}")
    out, copies, converted = select(src, dst, min_dur, max_dur,
                                    speed_perturb_factors or [Fraction(1)], min_audio_dur,
                                    bad_audio, nj, fs, resample)
    out.check(dst)
    todo = [copy for copy in copies if not copy.exists()]
    changed = conflicts(out, dst) + [c.target for c in todo if os.path.exists(c.target)]
    if changed and not overwrite:
        raise DataDirExistsError(
            f"{dst} already holds different formatted data ({', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''} would change); remove it or pass --overwrite"
        )
    if todo:
        logging.info(f"writing {len(todo)} converted or speed-perturbed files under "
                     f"{dst / 'audio'}")
        for folder in {Path(copy.target).parent for copy in todo}:
            folder.mkdir(parents=True, exist_ok=True)
        with worker_pool(nj) as pool_map:
            list(pool_map(write_copy, todo))
    write_data_dir(out, dst, overwrite=overwrite)
    record = dst / "converted"
    if converted:
        record.write_text("".join(f"{line}\n" for line in converted), encoding="utf-8")
    elif record.exists():
        record.unlink()
    return out


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--src", type=Path, required=True, help="prepared data dir, e.g. data/train"
    )
    parser.add_argument("--dst", type=Path, required=True, help="output, e.g. dump/raw/train")
    parser.add_argument(
        "--min_dur", type=float, default=0.0, help="seconds; shorter utterances are dropped"
    )
    parser.add_argument(
        "--max_dur",
        type=float,
        default=math.inf,
        help="seconds; longer utterances are dropped (default: keep all, as for test sets)",
    )
    parser.add_argument(
        "--speed_perturb_factors",
        type=parse_factors,
        default=None,
        help="e.g. '0.9 1.0 1.1'; 1.0 keeps the original utterances",
    )
    parser.add_argument("--min_audio_dur", type=float, default=0.0,
                        help="seconds; shorter audio is unusable (for sets without --min_dur)")
    parser.add_argument("--bad_audio", choices=BAD_AUDIO, default="fail",
                        help="unusable audio: fail listing it, or drop it with a warning")
    parser.add_argument("--fs", type=parse_rate, default=None,
                        help="the recipe's rate (8k, 16000): other rates are converted to it "
                             "(default: every file keeps its own)")
    parser.add_argument("--resample", choices=("true", "false"), default="true",
                        help="false: audio at another rate than --fs is refused, listed")
    parser.add_argument("--nj", type=int, default=1,
                        help="processes decoding and writing audio")
    add_overwrite_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    format_data(
        args.src,
        args.dst,
        min_dur=args.min_dur,
        max_dur=args.max_dur,
        speed_perturb_factors=args.speed_perturb_factors,
        overwrite=args.overwrite,
        nj=args.nj,
        min_audio_dur=args.min_audio_dur,
        bad_audio=args.bad_audio,
        fs=args.fs,
        resample=args.resample == "true",
    )


if __name__ == "__main__":
    run(main)
