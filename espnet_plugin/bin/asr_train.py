"""`python -m espnet_plugin.bin.asr_train`: ESPnet's ASR training with the plugin's classes registered. (registers at import:
spawned DDP workers re-import this module)."""

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet2.bin.asr_train import main

if __name__ == "__main__":
    main()
