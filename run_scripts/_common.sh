# Shared by run_scripts/padt_{ovd,rec,ric,pro}_{3b,7b}_sft.sh, each of which calls `padt_sft_main TASK SIZE "$@"`.
# The recipe is configs/train/sft_SIZE.yaml (hyperparameters, base model, DeepSpeed config) on the data mixture
# configs/data/TASK.yaml; this file parses the options (paths), resolves the configs' defaults and launches torchrun.

PADT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

padt_sft_usage() {  # TASK SIZE
    local train_yaml="configs/train/sft_$2.yaml" data_yaml="configs/data/$1.yaml"
    cat <<EOF
Usage: bash run_scripts/$(basename "$0") [options] [-- extra padt.train flags]

PaDT ${1^^} SFT with the authors' recipe (docs/training.md) under torchrun: 'python -m padt.train --config
${train_yaml}' on the data mixture ${data_yaml}, both printed below. Resumes from the last
checkpoint in the output directory when there is one.

Options (each also settable by the environment variable in brackets; default in parentheses):
  --model PATH_OR_HUB_ID      base model or PaDT checkpoint              [MODEL_NAME_OR_PATH]  (the config's)
  --output_dir DIR            where checkpoints and the final model go   [OUTPUT_DIR]  (outputs/padt_$1_$2_sft)
  --data_files F1:F2:...      ':'-separated JSONL files, local or hub     [DATA_FILE_PATHS]  (the mixture's)
  --image_folders D1:D2:...   ':'-separated image folders, one per file   [IMAGE_FOLDERS]  (the mixture's)
  --coco_root DIR             replaces data/coco in the mixture's folders  [COCO_ROOT]  (data/coco)
  --data_config YAML          a data mixture YAML instead of the two above [DATA_CONFIG]
  --deepspeed JSON            DeepSpeed config                            [DEEPSPEED_CONFIG]  (the config's)
  --report_to NAME            none, tensorboard or wandb                   [REPORT_TO]  (the config's)
  --attn_implementation NAME  sdpa or flash_attention_2                    [ATTN_IMPLEMENTATION]  (the config's)
  --per_device_batch N        samples per GPU                              [PER_DEVICE_BATCH]  (the config's)
  --dry_run                   print the launch command and exit            [DRY_RUN=1]
  -h, --help                  this help
Anything after '--' (or any other --flag value) goes to 'python -m padt.train' unchanged and overrides the config,
e.g. -- --use_lora true --freeze_vision true --num_vrt all.

Launcher (torchrun, run as \$PYTHON -m torch.distributed.run) environment, for one or several nodes:
  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (12349)  NPROC_PER_NODE (8)  PYTHON (python)
Multi-node: run the same command on every node with its NODE_RANK and the first node's MASTER_ADDR.
EOF
    local yaml
    for yaml in "${train_yaml}" "${data_yaml}"; do
        printf '\n%s:\n' "${yaml}"
        grep -v '^ *#' "${PADT_ROOT}/${yaml}" | sed 's/^/  /'
    done
}

padt_sft_main() {  # TASK SIZE [options]
    local task="$1" size="$2"
    shift 2
    local train_yaml="${PADT_ROOT}/configs/train/sft_${size}.yaml" data_yaml="${PADT_ROOT}/configs/data/${task}.yaml"
    local python="${PYTHON:-python}"
    local model="${MODEL_NAME_OR_PATH:-}"
    local output_dir="${OUTPUT_DIR:-outputs/padt_${task}_${size}_sft}"
    local coco_root="${COCO_ROOT:-data/coco}"
    local data_files="${DATA_FILE_PATHS:-}"
    local image_folders="${IMAGE_FOLDERS:-}"
    local data_config="${DATA_CONFIG:-}"
    local deepspeed="${DEEPSPEED_CONFIG:-}"
    local report_to="${REPORT_TO:-}"
    local attn="${ATTN_IMPLEMENTATION:-}"
    local batch="${PER_DEVICE_BATCH:-}"
    local dry_run="${DRY_RUN:-0}"
    local extra=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h|--help) padt_sft_usage "${task}" "${size}"; return 0 ;;
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

    # the configs' defaults: the mixture's files and folders (under coco_root), the DeepSpeed file from the root
    local defaults
    defaults="$("${python}" "${PADT_ROOT}/src/sft_recipe.py" "${train_yaml}" "${data_yaml}" "${coco_root}")"
    local mixture
    mapfile -t mixture <<< "${defaults}"
    local data_args=(--data_config "${data_config}")
    if [[ -z "${data_config}" ]]; then
        data_args=(--data_file_paths "${data_files:-${mixture[0]}}" --image_folders "${image_folders:-${mixture[1]}}")
    fi
    deepspeed="${deepspeed:-${mixture[2]:-}}"

    # the options given (or their variables) override the config; the config holds every other value
    local overrides=()
    [[ -n "${model}" ]] && overrides+=(--model_name_or_path "${model}")
    [[ -n "${deepspeed}" ]] && overrides+=(--deepspeed "${deepspeed}")
    [[ -n "${report_to}" ]] && overrides+=(--report_to "${report_to}")
    [[ -n "${attn}" ]] && overrides+=(--attn_implementation "${attn}")
    [[ -n "${batch}" ]] && overrides+=(--per_device_train_batch_size "${batch}")

    local cmd=(
        "${python}" -m torch.distributed.run  # = torchrun, with the chosen interpreter
        --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-8}"
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-12349}"
        -m padt.train
        --config "${train_yaml}"
        "${data_args[@]}"
        --output_dir "${output_dir}"
        "${overrides[@]}"
        --run_name "padt_${task}_${size}_sft"
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
