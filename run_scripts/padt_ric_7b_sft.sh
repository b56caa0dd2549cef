#!/usr/bin/env bash
# PaDT RIC (referring image captioning, COCO train2017) SFT of Qwen2.5-VL-7B-Instruct with the authors' recipe:
# configs/train/sft_7b.yaml on configs/data/ric.yaml (run_scripts/_common.sh). Options: --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
padt_sft_main ric 7b "$@"
