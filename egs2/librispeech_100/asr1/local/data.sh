#!/usr/bin/env bash
# LibriSpeech 100 h -> data/{train_clean_100,dev_clean,dev_other,dev,test_clean,test_other}
# (dev = dev-clean + dev-other, the validation set). Arguments go to
# espnet_plugin.recipe.librispeech after these defaults and override them, e.g.
#   local/data.sh --librispeech_dir /corpora --download
set -euo pipefail

python -m espnet_plugin.recipe.librispeech \
    --librispeech_dir "${LIBRISPEECH:-downloads}" \
    --data_dir data \
    --splits train-clean-100 dev-clean dev-other test-clean test-other \
    --combine dev=dev-clean,dev-other \
    "$@"
