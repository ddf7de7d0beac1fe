#!/usr/bin/env bash
# Small real-speech recipe: ~480 recorded Asterisk prompts (one speaker, 8 kHz), from data to WER
# on 2 CPU cores. Any option of asr.sh can be given here and overrides the defaults below:
#   ./run.sh --stage 5 --asr_config conf/tuning/train_asr_conformer_small.yaml
set -euo pipefail
cd "$(dirname "$0")"

./asr.sh \
    --lang en \
    --fs 8k \
    --nj 2 \
    --inference_nj 2 \
    --train_set train \
    --valid_set dev \
    --test_sets "dev test" \
    --token_type char \
    --speed_perturb_factors "0.9 1.0 1.1" \
    --asr_config conf/train_asr.yaml \
    --inference_config conf/decode_asr.yaml \
    "$@"
