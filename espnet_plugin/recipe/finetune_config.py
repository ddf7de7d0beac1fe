"""The training config of a fine-tuning run, from the config.yaml of the model it starts from.

A saved config.yaml holds what its run was given on the command line too: data lists, shape files
and fold lengths, which ESPnet's parser would append to those the recipe gives again, and the
output and initial weights of that run, and what ESPnet recorded of it that is no option (its
parser refuses those). They are left out; the training is shortened to
``--epochs`` at ``--lr_scale`` times the learning rate, warmed up over ``--warmup_steps`` (MHA2MLA
fine-tunes a converted model at about a tenth of the original learning rate, briefly warmed up).

    python -m espnet_plugin.recipe.finetune_config --config exp/x/conversion/config.yaml \\
        --epochs 4 --lr_scale 0.1 --warmup_steps 100 --out exp/y/finetune.yaml
"""

import argparse
from pathlib import Path

import yaml

from espnet_plugin.cli import UserError, run

# Keys of a saved config that belong to the run that wrote it (asr.sh gives them again).
RUN_KEYS = ("config", "output_dir", "init_param", "train_data_path_and_name_and_type",
            "valid_data_path_and_name_and_type", "train_shape_file", "valid_shape_file",
            "fold_length")
# Keys ESPnet writes into config.yaml that are no options: its parser refuses them in a --config.
RECORD_KEYS = ("required", "distributed", "version")


def finetune_config(config: dict, epochs: int, lr_scale: float, warmup_steps: int) -> dict:
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: a fine-tuning needs at least 1 epoch")
    if not lr_scale > 0:
        raise UserError(f"--lr_scale {lr_scale}: expected a positive factor")
    lr = (config.get("optim_conf") or {}).get("lr")
    if lr is None:
        raise UserError("the config's optim_conf has no lr to scale")
    tuned = {key: value for key, value in config.items() if key not in RUN_KEYS + RECORD_KEYS}
    tuned["max_epoch"] = epochs
    tuned["optim_conf"] = {**config["optim_conf"], "lr": lr * lr_scale}
    if config.get("scheduler") == "warmuplr":
        tuned["scheduler_conf"] = {**(config.get("scheduler_conf") or {}),
                                   "warmup_steps": warmup_steps}
    return tuned


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.recipe.finetune_config",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the starting model's config")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr_scale", type=float, default=0.1)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.config.is_file():
        raise UserError(f"--config {args.config}: no such file")
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise UserError(f"{args.config}: expected a YAML mapping")
    tuned = finetune_config(config, args.epochs, args.lr_scale, args.warmup_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(tuned, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")


if __name__ == "__main__":
    run(main)
