#!/usr/bin/env bash
# Evaluate one checkpoint on every task and split of the paper and print one table per task.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash run_scripts/eval_all.sh CKPT [OUT_DIR] [-- extra eval/evaluate.py flags]

Runs eval/evaluate.py for
  REC + RES  RefCOCO/+/g val, testA, testB (refcocog: val, test)  DATA_ROOT/RefCOCO/<split>.json, images COCO_ROOT/train2014
  OVD        COCO val2017                                          DATA_ROOT/COCO/instances_val2017.json, images COCO_ROOT/val2017
  RIC        RIC val2017                                           DATA_ROOT/ReferringImageCaptioning/ric_instances_val2017.json
and prints the table of OUT_DIR (default outputs/eval/$(basename CKPT)). Files that are missing are skipped with a
message. The data files are the released preprocessed JSONL sets (PaDT-MLLM/RefCOCO, /COCO,
/ReferringImageCaptioning). REC and RES share one set of predictions; a run that was interrupted resumes when the
same command is run again.

Environment:
  DATA_ROOT (data)          folder holding RefCOCO/, COCO/ and ReferringImageCaptioning/
  COCO_ROOT (data/coco)     folder holding train2014/, val2017/ and annotations/instances_val2017.json
                            (the official annotations are used for OVD when present, else the preprocessed records)
  PROTOCOL (paper)          standard: top-1 metrics only; paper: also the authors' best-of-N echo-keyed numbers
  TASKS (rec res ovd ric)   which tasks to run
  NPROC_PER_NODE (1)        processes (one per GPU); > 1 launches torchrun on 127.0.0.1:MASTER_PORT (29531)
  BATCH_SIZE (8)  MAX_NEW_TOKENS (1024)  PYTHON (python)
  DRY_RUN=1                 print the commands instead of running them
USAGE
}

source "$(dirname "${BASH_SOURCE[0]}")/_local.sh"
padt_local_start "$@"
CKPT="$1"
shift
OUT="outputs/eval/$(basename "${CKPT%/}")"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    OUT="$1"
    shift
fi
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")

DATA_ROOT=${DATA_ROOT:-data}
COCO_ROOT=${COCO_ROOT:-data/coco}
PROTOCOL=${PROTOCOL:-paper}
TASKS=${TASKS:-rec res ovd ric}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_PORT=${MASTER_PORT:-29531}
BATCH_SIZE=${BATCH_SIZE:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}

# ---------------------------------------------------------------- launcher
if [[ "$NPROC_PER_NODE" -gt 1 ]]; then
    LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC_PER_NODE" --master_addr 127.0.0.1
            --master_port "$MASTER_PORT")
else
    LAUNCH=("$PYTHON")
fi

run() {
    echo "+ $*" >&2
    if [[ "${DRY_RUN:-0}" != "1" ]]; then
        "$@"
    fi
}

existing() {  # print the arguments that are files; report the others
    for f in "$@"; do
        if [[ -f "$f" ]]; then echo "$f"; else echo "eval_all: skipping missing $f" >&2; fi
    done
}

evaluate() {  # TASK IMAGES FILE... : one evaluate.py call over the given splits
    local task="$1" images="$2"
    shift 2
    run "${LAUNCH[@]}" "$ROOT/eval/evaluate.py" --model "$CKPT" --task "$task" --data "$@" --images "$images" \
        --out "$OUT" --protocol "$PROTOCOL" --batch-size "$BATCH_SIZE" --max-new-tokens "$MAX_NEW_TOKENS" \
        "${EXTRA[@]}"
}

# ---------------------------------------------------------------- REC / RES (RefCOCO, RefCOCO+, RefCOCOg)
mapfile -t REFER < <(existing "$DATA_ROOT"/RefCOCO/refcoco_{val,testA,testB}.json \
    "$DATA_ROOT"/RefCOCO/refcoco+_{val,testA,testB}.json "$DATA_ROOT"/RefCOCO/refcocog_{val,test}.json)
for task in rec res; do
    if [[ " $TASKS " == *" $task "* && ${#REFER[@]} -gt 0 ]]; then
        evaluate "$task" "$COCO_ROOT/train2014" "${REFER[@]}"
    fi
done

# ---------------------------------------------------------------- OVD (COCO val2017)
mapfile -t OVD < <(existing "$DATA_ROOT/COCO/instances_val2017.json")
if [[ " $TASKS " == *" ovd "* && ${#OVD[@]} -gt 0 ]]; then
    ANN=()
    if [[ -f "$COCO_ROOT/annotations/instances_val2017.json" ]]; then
        ANN=(--annotations "$COCO_ROOT/annotations/instances_val2017.json")
    else
        echo "eval_all: no official $COCO_ROOT/annotations/instances_val2017.json; OVD uses the preprocessed ground truth" >&2
    fi
    EXTRA=("${ANN[@]}" "${EXTRA[@]}")
    evaluate ovd "$COCO_ROOT/val2017" "${OVD[@]}"
    EXTRA=("${EXTRA[@]:${#ANN[@]}}")
fi

# ---------------------------------------------------------------- RIC
mapfile -t RIC < <(existing "$DATA_ROOT/ReferringImageCaptioning/ric_instances_val2017.json")
if [[ " $TASKS " == *" ric "* && ${#RIC[@]} -gt 0 ]]; then
    evaluate ric "$COCO_ROOT/val2017" "${RIC[@]}"
fi

# ---------------------------------------------------------------- table
if [[ "${DRY_RUN:-0}" != "1" ]]; then
    echo
    "$PYTHON" -m padt.evaluation.table "$OUT"
fi
