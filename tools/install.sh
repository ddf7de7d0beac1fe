#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with espnet_plugin and its dependencies,
# plus the Debian tools the recipes and tests use when this runs as root (sctk's sclite, apt lists
# for `apt-get download`). Safe to re-run.
#
#   bash tools/install.sh            # creates .venv with python3 (3.11 or newer)
#   PYTHON=python3.12 bash tools/install.sh
#   PYTHON=python3.12 VENV=.venv312 bash tools/install.sh   # a second environment beside .venv
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${VENV:-.venv}
"${python}" -c 'pass' 2> /dev/null \
    || { echo "tools/install.sh: PYTHON=${python} does not run; set PYTHON to a Python 3.11 or newer" >&2; exit 1; }
"${python}" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "tools/install.sh: ${python} is older than 3.11; set PYTHON=python3.11 or newer" >&2; exit 1; }

if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get update -qq
    apt-get install -y -qq sctk > /dev/null
fi

[ -x "${venv}"/bin/python ] || "${python}" -m venv "${venv}"
# pip 25 and newer refuse espnet's dependency ci_sdr (a direct-URL dependency in its metadata).
"${venv}"/bin/python -m pip install -q 'pip<25'
"${venv}"/bin/python -m pip install -q -e '.[test,benchmark]'
# Mamba's fused CPU kernels: compiled once (about a minute) and cached; without a C++ compiler, or
# if the build fails, this says so and Mamba runs its PyTorch scan on CPUs.
"${venv}"/bin/python -m espnet_plugin.bin.build_cpu_kernels
"${venv}"/bin/python -c 'import espnet_plugin, torch, espnet; print("espnet", espnet.__version__, "torch", torch.__version__)'
