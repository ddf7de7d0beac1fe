"""`python -m espnet_plugin.bin.lm_calc_perplexity`: ESPnet's LM perplexity with the plugin's classes registered. (registers at import:
spawned DDP workers re-import this module)."""

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet2.bin.lm_calc_perplexity import main

if __name__ == "__main__":
    main()
