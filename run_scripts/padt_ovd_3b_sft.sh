#!/usr/bin/env bash
# PaDT OVD (COCO train2017) SFT of Qwen2.5-VL-3B-Instruct, the authors' recipe (4 epochs).
#   bash run_scripts/padt_ovd_3b_sft.sh --help
set -euo pipefail
TASK=ovd
SIZE=3b
EPOCHS=4
BASE_MODEL=Qwen/Qwen2.5-VL-3B-Instruct
DATA_FILES_DEFAULT="PaDT-MLLM/COCO/instances_train2017.json"
IMAGE_FOLDERS_DEFAULT="{COCO_ROOT}/train2017"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
padt_sft_main "$@"
