"""`python -m espnet_plugin.bin.benchmark_decoder`: see :mod:`espnet_plugin.benchmarks.decoder`."""

from espnet_plugin.benchmarks.decoder import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
