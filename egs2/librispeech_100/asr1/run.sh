#!/usr/bin/env bash
# LibriSpeech train-clean-100: ConMamba small baseline by default. Point it at an extracted corpus
# (the folder that holds LibriSpeech/) or let local/data.sh download it from openslr:
#   ./run.sh --local_data_opts "--librispeech_dir /corpora"
#   ./run.sh --local_data_opts "--librispeech_dir downloads --download" --ngpu 4
set -euo pipefail
cd "$(dirname "$0")"

./asr.sh \
    --lang en \
    --fs 16k \
    --ngpu 1 \
    --nj 16 \
    --inference_nj 8 \
    --train_set train_clean_100 \
    --valid_set dev \
    --test_sets "test_clean test_other dev_clean dev_other" \
    --max_wav_duration 30 \
    --speed_perturb_factors "0.9 1.0 1.1" \
    --token_type bpe \
    --nbpe 5000 \
    --asr_config conf/train_asr.yaml \
    --inference_config conf/decode_asr.yaml \
    "$@"
