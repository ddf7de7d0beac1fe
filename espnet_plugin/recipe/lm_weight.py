"""The LM weight of shallow fusion, chosen on a tuning set: the one whose decode has the lowest
WER (the smallest weight among equals). asr.sh's stage 8 decodes the tuning set with every weight
of ``--lm_weights``, scores each and asks this step which to decode the test sets with:

    python -m espnet_plugin.recipe.lm_weight --scores 0.1=<dir>/score_word/result.json ... \\
        --out exp/asr_x/lm_weight.json

It prints the weight and writes every weight's WER, the chosen one and the tuning set to ``--out``
(the report reads it).
"""

import argparse
import json
from pathlib import Path

from espnet_plugin.cli import UserError, run


def choose(wers: dict[float, float]) -> float:
    return min(sorted(wers), key=lambda weight: wers[weight])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.recipe.lm_weight",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", nargs="+", required=True,
                        help="<weight>=<score_word/result.json of the decode with that weight>")
    parser.add_argument("--tune_set", required=True, help="the set the weights were decoded on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    wers = {}
    for item in args.scores:
        weight, sep, path = item.partition("=")
        try:
            wers[float(weight)] = json.loads(Path(path).read_text(encoding="utf-8"))["error_rate"]
        except (ValueError, OSError, KeyError) as err:
            raise UserError(f"--scores {item}: expected <weight>=<result.json of a word score> "
                            f"({err})") from err
    chosen = choose(wers)
    args.out.write_text(json.dumps({"tune_set": args.tune_set, "wer": {str(w): e for w, e in
                                    sorted(wers.items())}, "chosen": chosen}, indent=2) + "\n",
                        encoding="utf-8")
    print(f"{chosen:g}")


if __name__ == "__main__":
    run(main)
