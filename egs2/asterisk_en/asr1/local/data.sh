#!/usr/bin/env bash
# Asterisk English prompts (one speaker, 8 kHz) -> data/{train,dev,test}, fetched with
# `apt-get download`. Arguments go to espnet_plugin.recipe.asterisk after these defaults, e.g.
#   local/data.sh --deb_dir /path/with/the/two/debs
set -euo pipefail

python -m espnet_plugin.recipe.asterisk \
    --data_dir data \
    --download_dir downloads \
    "$@"
