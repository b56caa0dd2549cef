#!/usr/bin/env bash
# Train a tiny random PaDT model for a few steps on CPU: what a newcomer runs to see training work without a GPU.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash run_scripts/padt_tiny_cpu_sft.sh OUTPUT_DIR [extra padt.train flags]

Builds a tiny random PaDT model and processor (OUTPUT_DIR/model) and a small generated dataset in the released
JSONL format (OUTPUT_DIR/data: 8 images of coloured shapes, 3 of them without objects), then trains it for a few
steps on CPU with torchrun and the gloo backend (OUTPUT_DIR/run: checkpoints, trainer_state.json, final model).
With NPROC_PER_NODE=2, one rank sees batches without objects while the other has objects.

Arguments:
  OUTPUT_DIR            folder for the model, the data and the run (created; an existing model/data is reused)
  extra flags           passed to 'python -m padt.train', e.g. --max_steps 8 --num_vrt all

Environment:
  NPROC_PER_NODE (1)    CPU processes
  MASTER_PORT (29517)   rendezvous port
  PYTHON (python)       interpreter with padt installed
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/_local.sh"
padt_local_start "$@"
OUT="$1"
shift
NPROC="${NPROC_PER_NODE:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ ! -f "${OUT}/data/train.jsonl" || ! -f "${OUT}/model/config.json" ]]; then
    "${PYTHON}" "${ROOT}/src/make_tiny_sft_data.py" --out "${OUT}"
fi

"${PYTHON}" -m torch.distributed.run --nnodes 1 --nproc_per_node "${NPROC}" \
    --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
    -m padt.train \
    --config "${ROOT}/configs/train/tiny_cpu.yaml" \
    --model_name_or_path "${OUT}/model" \
    --data_file_paths "${OUT}/data/train.jsonl" \
    --image_folders "${OUT}/data/images" \
    --output_dir "${OUT}/run" \
    --ddp_backend gloo \
    "$@"
echo "done: ${OUT}/run (trainer_state.json has the per-step losses)"
