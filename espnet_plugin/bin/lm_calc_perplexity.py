"""`python -m espnet_plugin.bin.lm_calc_perplexity`: ESPnet's LM perplexity, with the plugin's
classes registered and its safeguards installed (:mod:`espnet_plugin.safeguards`). Both happen
at import, so spawned DDP workers, which re-import this module, get them too."""

from espnet2.bin.lm_calc_perplexity import main

import espnet_plugin  # noqa: F401  (registers the plugin's classes)
from espnet_plugin import safeguards

safeguards.install()

if __name__ == "__main__":
    main()
