"""`python -m espnet_plugin.bin.benchmark_long_audio`: see :mod:`espnet_plugin.benchmarks.long_audio`."""

from espnet_plugin.benchmarks.long_audio import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
