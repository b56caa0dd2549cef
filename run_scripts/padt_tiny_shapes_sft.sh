#!/usr/bin/env bash
# Train the tiny PaDT shapes model from scratch on CPU, then evaluate it. Every value is in configs/shapes/recipe.yaml
# (the environment overrides it: see --help); src/shapes_recipe.py runs each step.
set -euo pipefail

usage() {
    "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/../src/shapes_recipe.py" usage sft
}

source "$(dirname "${BASH_SOURCE[0]}")/_local.sh"
padt_local_start "$@"
OUT="$1"
shift
RECIPE=("${PYTHON}" "${ROOT}/src/shapes_recipe.py")

"${RECIPE[@]}" data "${OUT}"          # 1. the synthetic scenes (DATA_DIR, default OUTPUT_DIR/data)
"${RECIPE[@]}" init "${OUT}"          # 2. a tiny random model (OUTPUT_DIR/init)
"${RECIPE[@]}" stage0 "${OUT}"        # 3. stage-0 vision pretraining (OUTPUT_DIR/init_vision)
"${RECIPE[@]}" train "${OUT}" "$@"    # 4. PaDT training (OUTPUT_DIR/run)
"${RECIPE[@]}" eval "${OUT}"          # 5. evaluation on the held-out scenes (OUTPUT_DIR/eval)
echo "done: model ${OUT}/run, metrics ${OUT}/eval"
