#!/usr/bin/env bash
# The whole study in one command: every model of conf/study.yaml trained, decoded, scored and
# profiled by ./run.sh (finished ones skipped, an interrupted training resumed), then the report.
#   ./run_study.sh [--models a,b] [--jobs N --gpus 0,1,...] [--launch_prefix "srun ..."] [--dry_run] [-- <run.sh options>]
# (python -m espnet_plugin.recipe.study --help lists every option)
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" -m espnet_plugin.recipe.study "$@"
