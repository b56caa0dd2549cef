# Shared by run_scripts/padt_{ovd,rec,ric,pro}_{3b,7b}_sft.sh: options, defaults and the torchrun launch.
# Not meant to be run directly: each recipe script sets TASK, SIZE, EPOCHS, BASE_MODEL, DATA_FILES_DEFAULT and
# IMAGE_FOLDERS_DEFAULT, then calls `padt_sft_main "$@"`.

PADT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

padt_sft_usage() {
    cat <<EOF
Usage: bash run_scripts/$(basename "$0") [options] [-- extra padt.train flags]

PaDT ${TASK^^} SFT of ${BASE_MODEL} with the authors' recipe (spec 9.1): ${EPOCHS} epochs, lr 2e-5,
per-device batch 16, grad accumulation 1, bf16, activation checkpointing, DeepSpeed ZeRO-3,
a checkpoint every 100 steps, logging every step, seed/data_seed 42. Resumes from the last checkpoint in the
output directory when there is one.

Options (each also settable by the environment variable in brackets):
  --model PATH_OR_HUB_ID      base model or PaDT checkpoint              [MODEL_NAME_OR_PATH]  (${BASE_MODEL})
  --output_dir DIR            where checkpoints and the final model go   [OUTPUT_DIR]  (outputs/padt_${TASK}_${SIZE}_sft)
  --data_files F1:F2:...      ':'-separated JSONL files, local or hub     [DATA_FILE_PATHS]
                              (${DATA_FILES_DEFAULT})
  --image_folders D1:D2:...   ':'-separated image folders, one per file   [IMAGE_FOLDERS]
                              (${IMAGE_FOLDERS_DEFAULT})
  --coco_root DIR             root of the default image folders           [COCO_ROOT]  (data/coco)
  --data_config YAML          a data mixture YAML instead of the two above [DATA_CONFIG]
  --deepspeed JSON            DeepSpeed config                            [DEEPSPEED_CONFIG]  (configs/deepspeed/zero3.json)
  --report_to NAME            none, tensorboard or wandb                   [REPORT_TO]  (none)
  --attn_implementation NAME  sdpa or flash_attention_2                    [ATTN_IMPLEMENTATION]  (sdpa)
  --per_device_batch N        samples per GPU                              [PER_DEVICE_BATCH]  (16)
  --dry_run                   print the launch command and exit            [DRY_RUN=1]
  -h, --help                  this help
Anything after '--' (or any other --flag value) goes to 'python -m padt.train' unchanged,
e.g. -- --use_lora true --freeze_vision true --num_vrt all.

Launcher (torchrun, run as \$PYTHON -m torch.distributed.run) environment, for one or several nodes:
  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (12349)  NPROC_PER_NODE (8)  PYTHON (python)
Multi-node: run the same command on every node with its NODE_RANK and the first node's MASTER_ADDR.
EOF
}

padt_sft_main() {
    local model="${MODEL_NAME_OR_PATH:-${BASE_MODEL}}"
    local output_dir="${OUTPUT_DIR:-outputs/padt_${TASK}_${SIZE}_sft}"
    local coco_root="${COCO_ROOT:-data/coco}"
    local data_files="${DATA_FILE_PATHS:-}"
    local image_folders="${IMAGE_FOLDERS:-}"
    local data_config="${DATA_CONFIG:-}"
    local deepspeed="${DEEPSPEED_CONFIG:-${PADT_ROOT}/configs/deepspeed/zero3.json}"
    local report_to="${REPORT_TO:-none}"
    local attn="${ATTN_IMPLEMENTATION:-sdpa}"
    local batch="${PER_DEVICE_BATCH:-16}"
    local dry_run="${DRY_RUN:-0}"
    local extra=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h|--help) padt_sft_usage; return 0 ;;
            --model) model="$2"; shift 2 ;;
            --output_dir) output_dir="$2"; shift 2 ;;
            --data_files) data_files="$2"; shift 2 ;;
            --image_folders) image_folders="$2"; shift 2 ;;
            --coco_root) coco_root="$2"; shift 2 ;;
            --data_config) data_config="$2"; shift 2 ;;
            --deepspeed) deepspeed="$2"; shift 2 ;;
            --report_to) report_to="$2"; shift 2 ;;
            --attn_implementation) attn="$2"; shift 2 ;;
            --per_device_batch) batch="$2"; shift 2 ;;
            --dry_run) dry_run=1; shift ;;
            --) shift; extra+=("$@"); break ;;
            *) extra+=("$1"); shift ;;
        esac
    done

    local data_args=()
    if [[ -n "${data_config}" ]]; then
        data_args=(--data_config "${data_config}")
    else
        data_files="${data_files:-${DATA_FILES_DEFAULT}}"
        image_folders="${image_folders:-${IMAGE_FOLDERS_DEFAULT//\{COCO_ROOT\}/${coco_root}}}"
        data_args=(--data_file_paths "${data_files}" --image_folders "${image_folders}")
    fi

    local cmd=(
        "${PYTHON:-python}" -m torch.distributed.run  # = torchrun, with the chosen interpreter
        --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-8}"
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-12349}"
        -m padt.train
        --model_name_or_path "${model}"
        "${data_args[@]}"
        --output_dir "${output_dir}"
        --deepspeed "${deepspeed}"
        --num_train_epochs "${EPOCHS}"
        --learning_rate 2e-5
        --per_device_train_batch_size "${batch}"
        --gradient_accumulation_steps 1
        --bf16 true
        --activation_checkpointing true
        --attn_implementation "${attn}"
        --logging_steps 1
        --save_steps 100
        --seed 42
        --data_seed 42
        --report_to "${report_to}"
        --run_name "padt_${TASK}_${SIZE}_sft"
        "${extra[@]}"
    )
    if [[ "${dry_run}" == "1" ]]; then
        printf '%q ' "${cmd[@]}"
        printf '\n'
        return 0
    fi
    export PYTHONPATH="${PADT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"  # padt importable without an install
    "${cmd[@]}"
}
