"""`python -m espnet_plugin.bin.asr_inference`: ESPnet's ASR decoding (Speech2Text) with the plugin's classes registered. (registers at import:
spawned DDP workers re-import this module)."""

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet2.bin.asr_inference import main

if __name__ == "__main__":
    main()
