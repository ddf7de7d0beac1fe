"""`python -m espnet_plugin.bin.profile_kv_cache`: see :mod:`espnet_plugin.benchmarks.kv_cache`."""

from espnet_plugin.benchmarks.kv_cache import main
from espnet_plugin.cli import run

if __name__ == "__main__":
    run(main)
