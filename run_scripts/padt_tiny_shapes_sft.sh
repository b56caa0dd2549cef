#!/usr/bin/env bash
# Train the tiny PaDT shapes model from scratch on CPU: data, model, training, evaluation (issue "shapes benchmark").
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash run_scripts/padt_tiny_shapes_sft.sh OUTPUT_DIR [extra padt.train flags]

1. generates the synthetic shapes data set (OUTPUT_DIR/data: NUM_IMAGES training scenes, NUM_VAL held-out scenes
   from a separate random stream), unless it is there already;
2. builds a tiny random Qwen2.5-VL-architecture PaDT model with the shapes tokenizer (OUTPUT_DIR/init);
3. stage 0: pretrains its vision tower to classify each merged cell by the colour and kind of its shape
   (OUTPUT_DIR/init_vision; VISION_STEPS=0 skips it);
4. trains it on REC/RES + OVD + RIC jointly with configs/train/tiny_shapes.yaml and the cell-category loss on
   colour x kind classes (OUTPUT_DIR/run; a rerun resumes);
5. evaluates the final model on the held-out scenes with eval/evaluate.py (OUTPUT_DIR/eval; skip with EVAL=0).
About 24 minutes on 2 CPU cores in session 12 (data 0.7, stage 0 5.5, PaDT training 17, evaluation 1; slower CPUs
take up to twice that; docs/shapes.md has the figures). The shipped model (padt/assets/tiny_default) was trained
longer, in legs (docs/shapes.md).

Arguments:
  OUTPUT_DIR            folder for data, init, run and eval (created); a rerun reuses what is there
  extra flags           passed to 'python -m padt.train', e.g. --max_steps 200 --num_vrt all --robust_ce false

Environment:
  NUM_IMAGES (12000)    training scenes           NUM_VAL (300)      held-out scenes
  SEED (0)              data seed                 EVAL (1)           evaluate after training
  VISION_STEPS (3000)   stage-0 steps before PaDT training (0 = none: the recipe before session 10)
  VISION_CLASSES        what stage 0 classifies each cell by: colour_kind (colour x kind, default) or kind
  CELL_CLASS_COEF (1)   weight of the cell-category loss (padt/shapes/cell_class_loss.py; 0 = off)
  CELL_CLASSES          its classes: colour_kind (default: the colour and kind that each REC sentence and each RIC
                        caption mention names) or kind (OVD objects' kinds, as in the shipped model's last legs)
  DATA_DIR              data folder to use or create (default OUTPUT_DIR/data; the ablations share one)
  EXTRA_DATA_DIRS       more generated training sets to mix in, space-separated (made beforehand with
                        src/preprocess/make_shapes.py and another --seed; same image size; evaluation stays on DATA_DIR)
  INIT_FLAGS            extra flags for 'python -m padt.testing.models', e.g. --no-prototype-projection
  EVAL_LIMIT (0)        evaluate only the first N held-out samples per task (0 = all)
  EVAL_FLAGS            flags for the four 'eval/evaluate.py' calls (default --distinct-vrts; EVAL_FLAGS= for none)
  REFER_REPEAT (1)      copies of each set's REC/RES training file in the mix (0 = leave the task out); likewise
  OVD_REPEAT (1)        OVD_REPEAT and RIC_REPEAT: a set has ~2.5 REC/RES records per scene and one OVD and one RIC
  RIC_REPEAT (1)        record, so OVD_REPEAT=2 RIC_REPEAT=2 gives the three tasks about equal shares
  NPROC (2)             training processes (data-parallel, gloo; 1 = one process); each gets OMP_NUM_THREADS / NPROC
                        threads: on 2 cores two 1-thread processes train 1.24x faster than one 2-thread process
  BATCH                 samples per optimizer step, split over the NPROC processes (default: the config's
                        per_device_train_batch_size, 16)
  PYTHON (python)       interpreter with padt installed
  OMP_NUM_THREADS (2)   torch threads (data generation uses every core)
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/_local.sh"
padt_local_start "$@"
OUT="$1"
shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
DATA="${DATA_DIR:-${OUT}/data}"
# the recipe's defaults (docs/shapes.md, "The tiny shapes model"); the environment overrides each
NUM_IMAGES="${NUM_IMAGES:-12000}"
VISION_STEPS="${VISION_STEPS:-3000}"
VISION_CLASSES="${VISION_CLASSES:-colour_kind}"
CELL_CLASS_COEF="${CELL_CLASS_COEF:-1}"
CELL_CLASSES="${CELL_CLASSES:-colour_kind}"
EVAL_FLAGS="${EVAL_FLAGS---distinct-vrts}"
CONFIG="${ROOT}/configs/train/tiny_shapes.yaml"
NPROC="${NPROC:-2}"
BATCH="${BATCH:-$("${PYTHON}" -c 'import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["per_device_train_batch_size"])' "${CONFIG}")}"
if [[ ! "${NPROC}" =~ ^[1-9][0-9]*$ || ! "${BATCH}" =~ ^[1-9][0-9]*$ ]] || (( BATCH % NPROC != 0 )); then
    echo "error: BATCH (${BATCH}) must be a positive multiple of NPROC (${NPROC}), the number of training processes" >&2
    exit 2
fi
# how object labels name the cell-category loss's classes (used below with CELL_CLASS_COEF > 0)
case "${CELL_CLASSES}" in
    kind) MATCH=exact ;;
    colour_kind) MATCH=phrase ;;
    *) echo "error: CELL_CLASSES must be kind or colour_kind, got '${CELL_CLASSES}'" >&2; exit 2 ;;
esac
# copies of each task's training file per set (the task mix): REFER_REPEAT, OVD_REPEAT, RIC_REPEAT
declare -A REPEATS
for TASK in refer ovd ric; do
    VAR="${TASK^^}_REPEAT"
    REPEATS[${TASK}]="${!VAR:-1}"
    if [[ ! "${REPEATS[${TASK}]}" =~ ^(0|[1-9][0-9]*)$ ]]; then
        echo "error: ${VAR} must be a whole number of copies (0 leaves the task out), got '${REPEATS[${TASK}]}'" >&2
        exit 2
    fi
done
if (( REPEATS[refer] + REPEATS[ovd] + REPEATS[ric] == 0 )); then
    echo "error: REFER_REPEAT, OVD_REPEAT and RIC_REPEAT are all 0: no training data left" >&2
    exit 2
fi

if [[ ! -f "${DATA}/manifest.json" ]]; then
    "${PYTHON}" "${ROOT}/src/preprocess/make_shapes.py" --out "${DATA}" --num-images "${NUM_IMAGES}" \
        --num-val-images "${NUM_VAL:-300}" --seed "${SEED:-0}"
fi

# min_pixels = max_pixels = the scenes' pixel count (manifest.json), so the processor keeps them as they are
manifest_pixels() {
    "${PYTHON}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["processor"]["max_pixels"])' "$1/manifest.json"
}
PIXELS="$(manifest_pixels "${DATA}")"

# REC/RES + OVD + RIC of every training set (each file REPEATS times), one image folder per file
FILES="" FOLDERS=""
for D in "${DATA}" ${EXTRA_DATA_DIRS:-}; do
    if [[ ! -f "${D}/manifest.json" ]]; then
        echo "error: ${D} has no manifest.json (EXTRA_DATA_DIRS must hold generated shapes sets)" >&2
        exit 2
    fi
    SET_PIXELS="$(manifest_pixels "${D}")"
    if [[ "${SET_PIXELS}" != "${PIXELS}" ]]; then
        echo "error: ${D} has ${SET_PIXELS}-pixel scenes, ${DATA} has ${PIXELS}: one image size per model" >&2
        exit 2
    fi
    for TASK in refer ovd ric; do
        for ((COPY = 0; COPY < REPEATS[${TASK}]; COPY++)); do
            FILES="${FILES:+${FILES}:}${D}/${TASK}_train.jsonl"
            FOLDERS="${FOLDERS:+${FOLDERS}:}${D}/images"
        done
    done
done

# The real Qwen2.5-VL architecture at toy sizes. Rotary settings: at these head sizes Qwen's defaults (text theta 1e6,
# mrope 8/4/4; vision theta 1e4) leave image rows and columns almost unrotated, so a model trained from scratch could
# not tell where a cell is (docs/shapes.md). merge_block: the geometrically consistent decoder feature order.
if [[ ! -f "${OUT}/init/config.json" ]]; then
    "${PYTHON}" -m padt.testing.models --out "${OUT}/init" --training-start --seed 0 \
        --text-hidden-size 128 --text-layers 4 --vision-hidden-size 64 --vision-depth 4 --vision-heads 4 \
        --window-size 224 --text-rope-theta 10 --mrope-section 2 7 7 --vision-rope-theta 100 \
        --vrt-feature-order merge_block --min-pixels "${PIXELS}" --max-pixels "${PIXELS}" ${INIT_FLAGS:-}
fi

# Stage 0 (VISION_STEPS > 0; docs/shapes.md has what it measured): the vision tower learns each merged cell's classes
# (VISION_CLASSES), pixels and position from the training scenes, a stand-in for Qwen2.5-VL's pretrained tower
# (padt/shapes/vision_pretrain.py). PaDT training then trains the tower at the full rate (the cell-category loss keeps the
# classes; the earlier experiments passed --vision_lr_scale 0.1). A rerun resumes stage 0 or reuses
# OUTPUT_DIR/init_vision.
INIT="${OUT}/init"
if [[ "${VISION_STEPS}" != "0" ]]; then
    if [[ ! -f "${OUT}/init_vision/vision_pretrain.json" ]]; then
        "${PYTHON}" "${ROOT}/src/pretrain_shapes_vision.py" --model "${OUT}/init" --data "${DATA}" ${EXTRA_DATA_DIRS:-} \
            --out "${OUT}/init_vision" --steps "${VISION_STEPS}" --cell-classes "${VISION_CLASSES}"
    fi
    INIT="${OUT}/init_vision"
fi

# The cell-category loss (CELL_CLASS_COEF > 0) on the scenes' classes (manifest.json). CELL_CLASSES=kind: the
# OVD objects' cells learn their kind (labels equal to a kind); colour_kind: the referred object's cells learn the
# "colour kind" its REC sentence names (phrase match: "the red square on the left" -> "red square"), and every RIC
# object's cells the one its caption mention names ("A red square (<|Obj_0|>)" -> "red square").
CELL_FLAGS=()
if [[ "${CELL_CLASS_COEF}" != "0" ]]; then
    NAMES_TEXT="$("${PYTHON}" -c 'import json, sys; from padt.shapes.benchmark import cell_class_names
print(*cell_class_names(json.load(open(sys.argv[1]))["options"], sys.argv[2]), sep="\n")' \
        "${DATA}/manifest.json" "${CELL_CLASSES}")"
    mapfile -t NAMES <<< "${NAMES_TEXT}"
    CELL_FLAGS=(--cell_class_loss_coef "${CELL_CLASS_COEF}" --cell_class_names "${NAMES[@]}" --cell_class_match "${MATCH}")
fi

# NPROC processes of OMP_NUM_THREADS / NPROC threads each, BATCH / NPROC samples per process and step
TRAIN=("${PYTHON}" -m padt.train)
if (( NPROC > 1 )); then
    TRAIN=("${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}" -m padt.train
        --ddp_backend gloo)
fi
OMP_NUM_THREADS="$(( OMP_NUM_THREADS > NPROC ? OMP_NUM_THREADS / NPROC : 1 ))" "${TRAIN[@]}" --config "${CONFIG}" \
    --per_device_train_batch_size "$(( BATCH / NPROC ))" \
    --model_name_or_path "${INIT}" \
    --data_file_paths "${FILES}" \
    --image_folders "${FOLDERS}" \
    --output_dir "${OUT}/run" \
    --min_pixels "${PIXELS}" --max_pixels "${PIXELS}" \
    "${CELL_FLAGS[@]}" "$@"

if [[ "${EVAL:-1}" != "0" ]]; then
    read -r -a EVAL_ARGS <<< "${EVAL_FLAGS}"
    [[ "${EVAL_LIMIT:-0}" != "0" ]] && EVAL_ARGS+=(--limit "${EVAL_LIMIT}")
    # REC and RES score the same predictions (one generation per record; the second call only scores)
    for TASK in rec res; do
        "${PYTHON}" "${ROOT}/eval/evaluate.py" --model "${OUT}/run" --task "${TASK}" --data "${DATA}/refer_val.jsonl" \
            --images "${DATA}/images" --out "${OUT}/eval" --batch-size 16 --no-progress "${EVAL_ARGS[@]}"
    done
    "${PYTHON}" "${ROOT}/eval/evaluate.py" --model "${OUT}/run" --task ovd --data "${DATA}/ovd_val.jsonl" \
        --images "${DATA}/images" --annotations "${DATA}/coco_val.json" --out "${OUT}/eval" --batch-size 16 \
        --no-progress "${EVAL_ARGS[@]}"
    "${PYTHON}" "${ROOT}/eval/evaluate.py" --model "${OUT}/run" --task ric --data "${DATA}/ric_val.jsonl" \
        --images "${DATA}/images" --out "${OUT}/eval" --batch-size 16 --no-progress "${EVAL_ARGS[@]}"
    "${PYTHON}" -m padt.evaluation.table "${OUT}/eval"
fi
echo "done: model ${OUT}/run, metrics ${OUT}/eval"
