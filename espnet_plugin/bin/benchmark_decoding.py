"""`python -m espnet_plugin.bin.benchmark_decoding`: see :mod:`espnet_plugin.benchmarks.decoding`."""

from espnet_plugin.benchmarks.decoding import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
