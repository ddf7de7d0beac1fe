"""`python -m espnet_plugin.bin.build_cpu_kernels`: see :mod:`espnet_plugin.nets.cpu_kernels`."""

from espnet_plugin.nets.cpu_kernels import main

if __name__ == "__main__":
    main()
