"""`python -m espnet_plugin.bin.asr_inference`: ESPnet's ASR decoding, with the plugin's classes
registered and its safeguards installed (:mod:`espnet_plugin.safeguards`). Both happen at
import, so spawned DDP workers, which re-import this module, get them too. Every input's audio
is checked before decoding starts. Utterances are decoded in batches (``--batch_size``,
``--batch_frames``) by the plugin's batched beam search where the model allows it
(:mod:`espnet_plugin.decoding.inference`), else by ESPnet's own program."""

import sys

from espnet2.bin.asr_inference import main

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin import safeguards
from espnet_plugin.cli import run
from espnet_plugin.decoding import inference

safeguards.install()

if __name__ == "__main__":
    run(lambda: safeguards.check_audio_inputs(sys.argv[1:]), log_level=None)
    run(lambda: inference.main(sys.argv[1:], espnet_main=main), log_level=None)
