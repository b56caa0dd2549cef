#!/usr/bin/env bash
# PaDT PaDT Pro (RIC + COCO twice + RefCOCO/+/g train) SFT of Qwen2.5-VL-7B-Instruct, the authors' recipe (6 epochs).
#   bash run_scripts/padt_pro_7b_sft.sh --help
set -euo pipefail
TASK=pro
SIZE=7b
EPOCHS=6
BASE_MODEL=Qwen/Qwen2.5-VL-7B-Instruct
DATA_FILES_DEFAULT="PaDT-MLLM/ReferringImageCaptioning/ric_instances_train2017.json:PaDT-MLLM/COCO/instances_train2017.json:PaDT-MLLM/COCO/instances_train2017.json:PaDT-MLLM/RefCOCO/refcoco_train.json:PaDT-MLLM/RefCOCO/refcoco+_train.json:PaDT-MLLM/RefCOCO/refcocog_train.json"
IMAGE_FOLDERS_DEFAULT="{COCO_ROOT}/train2017:{COCO_ROOT}/train2017:{COCO_ROOT}/train2017:{COCO_ROOT}/train2014:{COCO_ROOT}/train2014:{COCO_ROOT}/train2014"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
padt_sft_main "$@"
