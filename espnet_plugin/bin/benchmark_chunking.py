"""`python -m espnet_plugin.bin.benchmark_chunking`: see
:mod:`espnet_plugin.benchmarks.chunking`."""

from espnet_plugin.benchmarks.chunking import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
