"""`python -m espnet_plugin.bin.asr_train`: ESPnet's ASR training, with the plugin's classes
registered and its safeguards installed (:mod:`espnet_plugin.safeguards`). Both happen at
import, so spawned DDP workers, which re-import this module, get them too."""

from espnet2.bin.asr_train import main

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin import safeguards

safeguards.install()

if __name__ == "__main__":
    main()
