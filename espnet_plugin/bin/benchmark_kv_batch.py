"""`python -m espnet_plugin.bin.benchmark_kv_batch`: see :mod:`espnet_plugin.benchmarks.kv_batch`."""

from espnet_plugin.benchmarks.kv_batch import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
