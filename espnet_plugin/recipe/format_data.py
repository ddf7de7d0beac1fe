"""Recipe formatting step: a prepared data dir -> ``dump/raw/<set>``, what ESPnet training reads.

Adds ``utt2num_samples`` (from the audio headers, nothing is decoded), drops utterances outside
the duration limits or with empty transcripts, and adds speed-perturbed copies when asked: the
Kaldi/ESPnet recipe augmentation, with ``sp<factor>-`` prefixed utterance and speaker ids and
the perturbed audio written once to ``<dst>/audio/sp<factor>/`` so training only reads files.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile
import torch
import torchaudio

from espnet_plugin.cli import UserError, run
from espnet_plugin.recipe.kaldi_data import (
    DataDir,
    DataDirExistsError,
    add_overwrite_option,
    audio_info,
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


def perturbed_length(num_samples: int, factor: Fraction) -> int:
    """Samples after speeding up by ``factor``: ceil(num_samples / factor), as resampling gives."""
    return -(-num_samples * factor.denominator // factor.numerator)


def speed_perturb(wave: np.ndarray, factor: Fraction) -> np.ndarray:
    """Play ``wave`` (frames, channels) ``factor`` times faster, like sox ``speed``.

    Reading the samples as if recorded at ``factor`` times the rate and resampling back keeps the
    sample rate and scales duration by 1/factor; pitch moves with it, as in Kaldi and ESPnet.
    """
    signal = torch.from_numpy(np.ascontiguousarray(wave.T))
    faster = torchaudio.functional.resample(signal, factor.numerator, factor.denominator)
    return faster.T.numpy()


class PerturbedCopy(NamedTuple):
    """One speed-perturbed audio file: made from ``source``, ``num_samples`` long."""

    source: str
    target: str
    factor: Fraction
    num_samples: int
    samplerate: int

    def exists(self) -> bool:
        """Whether ``target`` already holds a copy of the expected length and rate."""
        try:
            info = soundfile.info(self.target)
        except RuntimeError:  # absent or unreadable
            return False
        return info.frames == self.num_samples and info.samplerate == self.samplerate


def write_perturbed(copy: PerturbedCopy) -> None:
    """Write one perturbed copy as 16-bit FLAC, atomically."""
    wave, rate = soundfile.read(copy.source, dtype="float32", always_2d=True)
    faster = np.clip(speed_perturb(wave, copy.factor), -1.0, 1.0)
    tmp = f"{copy.target}.partial"
    soundfile.write(tmp, faster, rate, format="FLAC", subtype="PCM_16")
    os.replace(tmp, copy.target)


def _single_thread() -> None:
    # One file's resampling is too small to share out: threads cost more than they give
    # (3x slower with 2 threads on a 2-core machine); --nj processes parallelise instead.
    torch.set_num_threads(1)


def select(
    src: Path, dst: Path, min_dur: float, max_dur: float, factors: list[Fraction]
) -> tuple[DataDir, list[PerturbedCopy]]:
    """The output tables, originals and ``sp<factor>-`` copies within the duration limits, and
    the perturbed files they refer to. Only audio headers are read.
    """
    data = read_data_dir(src, allow_empty_text=True)
    empty = [utt for utt in data.utts if not data.text[utt].strip()]
    if empty:
        logging.info(f"dropped {len(empty)} utterances with an empty transcript: {empty}")
    infos = {
        utt: audio_info(data.wav_scp[utt], f"{src}/wav.scp: utterance '{utt}'")
        for utt in data.utts
        if utt not in empty
    }
    out = DataDir(wav_scp={}, text={}, utt2spk={}, utt2num_samples={})
    copies, too_short, too_long = [], [], []
    for factor in factors:
        prefix = "" if factor == 1 else f"{perturbation_name(factor)}-"
        audio_dir = (dst / "audio" / perturbation_name(factor)).resolve()
        for utt, info in infos.items():
            new_utt, num_samples = prefix + utt, perturbed_length(info.frames, factor)
            duration = num_samples / info.samplerate
            if duration < min_dur or duration > max_dur:
                (too_short if duration < min_dur else too_long).append(new_utt)
                continue
            source = data.wav_scp[utt]
            if factor == 1:
                out.wav_scp[new_utt] = source
            else:
                target = str(audio_dir / f"{utt}.flac")
                copies.append(PerturbedCopy(source, target, factor, num_samples, info.samplerate))
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
    return out, copies


def format_data(
    src: str | Path,
    dst: str | Path,
    min_dur: float = 0.0,
    max_dur: float = math.inf,
    speed_perturb_factors: list[Fraction] | None = None,
    overwrite: bool = False,
    nj: int = 1,
) -> DataDir:
    """Write the formatted (and perturbed) copy of ``src`` to ``dst``; returns what was written.

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
    out, copies = select(src, dst, min_dur, max_dur, speed_perturb_factors or [Fraction(1)])
    out.check(dst)
    todo = [copy for copy in copies if not copy.exists()]
    changed = conflicts(out, dst) + [c.target for c in todo if os.path.exists(c.target)]
    if changed and not overwrite:
        raise DataDirExistsError(
            f"{dst} already holds different formatted data ({', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''} would change); remove it or pass --overwrite"
        )
    if todo:
        logging.info(f"writing {len(todo)} speed-perturbed files under {dst / 'audio'}")
        for folder in {Path(copy.target).parent for copy in todo}:
            folder.mkdir(parents=True, exist_ok=True)
        if nj > 1:
            with ProcessPoolExecutor(nj, initializer=_single_thread) as pool:
                list(pool.map(write_perturbed, todo, chunksize=16))
        else:
            threads = torch.get_num_threads()
            _single_thread()
            try:
                for copy in todo:
                    write_perturbed(copy)
            finally:
                torch.set_num_threads(threads)
    write_data_dir(out, dst, overwrite=overwrite)
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
    parser.add_argument("--nj", type=int, default=1, help="processes writing perturbed audio")
    add_overwrite_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    format_data(
        args.src,
        args.dst,
        args.min_dur,
        args.max_dur,
        args.speed_perturb_factors,
        args.overwrite,
        args.nj,
    )


if __name__ == "__main__":
    run(main)
