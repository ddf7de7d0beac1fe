"""`python -m espnet_plugin.bin.convert_attention`: see :mod:`espnet_plugin.convert_attention`."""

import logging

from espnet_plugin.cli import run
from espnet_plugin.convert_attention import main

if __name__ == "__main__":
    run(main, log_level=logging.WARNING)  # ESPnet's beam search logs every step at INFO
