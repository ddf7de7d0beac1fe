"""`python -m espnet_plugin.bin.benchmark_encoder`: see :mod:`espnet_plugin.benchmarks.encoder`."""

from espnet_plugin.benchmarks.encoder import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
