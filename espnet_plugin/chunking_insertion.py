"""A trained encoder given H-Net dynamic chunking afterwards: ``convert_attention --target
dynamic_chunking`` inserts a freshly initialised router after one of its blocks, to be fine-tuned
(the MHA2MLA way: a trained model changed, then a short training), against training the chunked
model from scratch.

Every weight of the trained model is kept as it is; the router's are those of a new
:class:`espnet_plugin.nets.encoders.ChunkingStage` (H-Net's start: it compares raw frames, the
dechunker's residual is off). The blocks before the router therefore compute exactly what they
computed; only what follows it sees fewer frames.
"""

import argparse

from torch import nn

from espnet_plugin.cli import UserError
from espnet_plugin.nets.encoders import BlockStackEncoder

CHUNKING = "encoder.chunking"  # the router's name in the state dict


def chunking_options(args: argparse.Namespace) -> dict:
    """The ``encoder_conf.dynamic_chunking`` mapping the command's options give."""
    return {"after_block": args.after_block, "target_ratio": args.target_ratio,
            "ratio_loss_weight": args.ratio_loss_weight, "min_keep_ratio": args.min_keep_ratio,
            "output": args.chunking_output}


def chunked_config(config: dict, model: nn.Module, options: dict, source: str) -> dict:
    """``config`` with dynamic chunking in its encoder and ``model: espnet_aux`` (which adds the
    router's ratio loss to the training loss); a UserError names what does not fit."""
    encoder = model.encoder
    if not isinstance(encoder, BlockStackEncoder):
        raise UserError(f"{source}: encoder {type(encoder).__name__} is not one of this project's "
                        "block-stack encoders (conmamba, conformer_x, branchformer_x): no place "
                        "for a router")
    if encoder.chunking is not None:
        raise UserError(f"{source}: the encoder already has dynamic chunking (after block "
                        f"{encoder.chunking.after_block})")
    if not 0 < options["after_block"] < len(encoder.blocks):
        raise UserError(f"--after_block {options['after_block']}: expected "
                        f"1..{len(encoder.blocks) - 1} (the encoder has {len(encoder.blocks)} "
                        "blocks)")
    encoder_conf = {**(config.get("encoder_conf") or {}), "dynamic_chunking": options}
    if config.get("model", "espnet") not in ("espnet", "espnet_aux"):
        raise UserError(f"{source}: model {config['model']}: the router's ratio loss needs "
                        "model: espnet (made espnet_aux) or espnet_aux")
    return {**config, "encoder_conf": encoder_conf, "model": "espnet_aux"}


def fresh_router(target: nn.Module) -> dict[str, nn.Module]:
    """The module to add to the trained weights, by its state-dict name: the new model's router."""
    return {CHUNKING: target.encoder.chunking}
