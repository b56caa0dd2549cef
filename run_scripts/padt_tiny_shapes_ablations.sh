#!/usr/bin/env bash
# The paper's ablations on the shapes benchmark: full PaDT, no prototype projection, no robust CE, all foreground VRTs.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash run_scripts/padt_tiny_shapes_ablations.sh OUTPUT_DIR [extra padt.train flags for every variant]

Trains and evaluates four tiny shapes models from scratch with run_scripts/padt_tiny_shapes_sft.sh on one shared data
set (OUTPUT_DIR/data), each in OUTPUT_DIR/<variant>, then prints their metrics side by side:
  full            the PaDT recipe (configs/train/tiny_shapes.yaml)
  no_projection   prototypes = the merged image embeddings (no LN + low-rank projection)
  no_robust_ce    plain cross-entropy at VRT targets (the object's other cells are not masked out)
  all_vrt         every foreground cell of an object is a VRT target instead of 5 sampled ones
A variant whose run is complete is not trained again (delete its folder to redo it).

Environment:
  MAX_STEPS (1000)      optimizer steps per variant (the shapes script's recipe uses 4000)
  VARIANTS              subset to run, e.g. "full all_vrt" (default: all four)
  EVAL_LIMIT (0)        evaluate only the first N held-out samples per task (0 = all)
  EVAL (1)              0: train only (no evaluation, no table)
  LEARNING_RATE (2e-3)  peak learning rate of every variant
  DECODER_LR_SCALE (1)  the decoder's rate = LEARNING_RATE x this
  and those of padt_tiny_shapes_sft.sh (NUM_VAL, SEED, PYTHON, OMP_NUM_THREADS, ...). The ablations keep the recipe
  they were measured with (README), the shapes script's defaults before session 10: NUM_IMAGES (4000),
  VISION_STEPS (0: no stage 0), CELL_CLASS_COEF (0: no cell-category loss), EVAL_FLAGS (none), the learning rate
  before session 11, LEARNING_RATE, and before session 12: one training process (NPROC=1), DECODER_LR_SCALE; set
  them to change it.
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/_local.sh"
padt_local_start "$@"
OUT="$1"
shift
STEPS="${MAX_STEPS:-1000}"

run_variant() {
    local name="$1" init_flags="$2"
    shift 2
    DATA_DIR="${OUT}/data" INIT_FLAGS="${init_flags}" NUM_IMAGES="${NUM_IMAGES:-4000}" \
        VISION_STEPS="${VISION_STEPS:-0}" CELL_CLASS_COEF="${CELL_CLASS_COEF:-0}" EVAL_FLAGS="${EVAL_FLAGS-}" \
        NPROC="${NPROC:-1}" bash "${ROOT}/run_scripts/padt_tiny_shapes_sft.sh" "${OUT}/${name}" \
        --max_steps "${STEPS}" --save_steps "${STEPS}" --learning_rate "${LEARNING_RATE:-2e-3}" \
        --decoder_lr_scale "${DECODER_LR_SCALE:-1}" "$@"
}

TABLE=()
for VARIANT in ${VARIANTS:-full no_projection no_robust_ce all_vrt}; do
    case "${VARIANT}" in
        full) run_variant full "" "$@" ;;
        no_projection) run_variant no_projection "--no-prototype-projection" "$@" ;;
        no_robust_ce) run_variant no_robust_ce "" --robust_ce false "$@" ;;
        all_vrt) run_variant all_vrt "" --num_vrt all "$@" ;;
        *) echo "unknown variant '${VARIANT}' (full, no_projection, no_robust_ce, all_vrt)" >&2; exit 2 ;;
    esac
    TABLE+=("${VARIANT}=${OUT}/${VARIANT}/eval")
done
if [[ "${EVAL:-1}" != "0" ]]; then
    "${PYTHON}" -m padt.evaluation.table "${TABLE[@]}"
fi
