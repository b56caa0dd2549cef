#!/usr/bin/env bash
# The paper's ablations on the shapes benchmark: full PaDT, no prototype projection, no robust CE, all foreground
# VRTs, each trained with run_scripts/padt_tiny_shapes_sft.sh. Variants and settings: configs/shapes/ablations.yaml.
set -euo pipefail

usage() {
    "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/../src/shapes_recipe.py" usage ablations
}

source "$(dirname "${BASH_SOURCE[0]}")/_local.sh"
padt_local_start "$@"
exec "${PYTHON}" "${ROOT}/src/shapes_recipe.py" ablations "$@"
