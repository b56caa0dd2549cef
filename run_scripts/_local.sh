# Shared start of the local scripts (padt_tiny_*.sh, eval_all.sh): source it after defining `usage`, then call
# `padt_local_start "$@"`. It prints the usage and exits (0 for -h/--help, 2 with no argument) and otherwise sets
# ROOT (the repository), PYTHON (default python) and PYTHONPATH (ROOT first). The caller then reads "$1" itself.

padt_local_start() {
    if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
        usage
        [[ $# -ge 1 ]] && exit 0 || exit 2
    fi
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    PYTHON="${PYTHON:-python}"
    export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
}
