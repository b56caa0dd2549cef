#!/usr/bin/env bash
# PaDT Pro (RIC + COCO twice + RefCOCO/+/g train) SFT of Qwen2.5-VL-3B-Instruct with the authors' recipe:
# configs/train/sft_3b.yaml on configs/data/pro.yaml (run_scripts/_common.sh). Options: --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
padt_sft_main pro 3b "$@"
