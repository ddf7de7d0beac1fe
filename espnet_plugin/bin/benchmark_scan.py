"""`python -m espnet_plugin.bin.benchmark_scan`: see :mod:`espnet_plugin.benchmarks.scan`."""

from espnet_plugin.benchmarks.scan import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
