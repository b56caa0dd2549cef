#!/usr/bin/env bash
# PaDT PaDT Pro (RIC + COCO twice + RefCOCO/+/g train) SFT of Qwen2.5-VL-3B-Instruct, the authors' recipe (4 epochs).
#   bash run_scripts/padt_pro_3b_sft.sh --help
set -euo pipefail
TASK=pro
SIZE=3b
EPOCHS=4
BASE_MODEL=Qwen/Qwen2.5-VL-3B-Instruct
DATA_FILES_DEFAULT="PaDT-MLLM/ReferringImageCaptioning/ric_instances_train2017.json:PaDT-MLLM/COCO/instances_train2017.json:PaDT-MLLM/COCO/instances_train2017.json:PaDT-MLLM/RefCOCO/refcoco_train.json:PaDT-MLLM/RefCOCO/refcoco+_train.json:PaDT-MLLM/RefCOCO/refcocog_train.json"
IMAGE_FOLDERS_DEFAULT="{COCO_ROOT}/train2017:{COCO_ROOT}/train2017:{COCO_ROOT}/train2017:{COCO_ROOT}/train2014:{COCO_ROOT}/train2014:{COCO_ROOT}/train2014"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
padt_sft_main "$@"
