#!/usr/bin/env bash
# The first minutes on a CUDA machine, in one command: install the project (offline, no
# dependencies: torch comes with the machine), run the CUDA tests and the attention-backend tests,
# then the benchmark's bf16 rows side by side (APT against the dense model, eager and compiled,
# merging off and the paper's thresholds, peak memory per side) for the 512 segmentation backbone
# and the 1024 and 1536 detection backbones. Every result lands in one folder; a tarball of it and
# a summary.md sit at its top, so that a copy-back limited to a few files still gets everything.
#
#   tools/gpu_check.sh [--output DIR] [--budget SECONDS] [--dry-run]
#
# --budget (default 450 s) bounds the whole run: each step gets what is left, the benchmark rows
# run in order of importance, and a row that would start with too little time left is skipped and
# named in the summary. --dry-run wires every step on the CPU without timing anything (pytest
# collects the CUDA tests without running them; each benchmark row runs once at depth 1 on one
# photo with dynamo's eager backend) so that CI proves the command works before a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUTPUT=""
BUDGET=450
DRY_RUN=0

usage() { echo "usage: tools/gpu_check.sh [--output DIR] [--budget SECONDS] [--dry-run]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --output) [ $# -ge 2 ] || usage; OUTPUT=$2; shift 2 ;;
        --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; usage ;;
    esac
done
case "$BUDGET" in
    ''|*[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
if [ -z "$OUTPUT" ]; then
    OUTPUT="gpu_check_results/$(date +%Y%m%d-%H%M%S)"
fi
if ! mkdir -p "$OUTPUT/raw" 2>/dev/null || [ ! -w "$OUTPUT" ]; then
    echo "gpu_check.sh: cannot write to --output $OUTPUT; name a writable folder" >&2
    exit 2
fi
RAW="$OUTPUT/raw"
SUMMARY="$OUTPUT/summary.md"
START=$(date +%s)
FAILED=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME MIN_SECONDS COMMAND...: runs COMMAND with the time left, its output in raw/NAME.log.
step() {
    local name=$1 need=$2; shift 2
    local remaining; remaining=$(left)
    if [ "$remaining" -lt "$need" ]; then
        note "- $name: SKIPPED, ${remaining}s of the budget left (needs about ${need}s)"
        return 0
    fi
    local began; began=$(date +%s)
    timeout --signal=INT --kill-after=20 "$remaining" "$@" >"$RAW/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - began ))
    if [ $rc -eq 0 ]; then
        note "- $name: ok (${took}s)"
    else
        FAILED=1
        note "- $name: FAILED with exit $rc after ${took}s (raw/$name.log):"
        tail -n 15 "$RAW/$name.log" | sed 's/^/      /' | tee -a "$SUMMARY"
    fi
}

if [ $DRY_RUN -eq 1 ]; then
    INSTALL_MODE=(--dry-run)
    DEVICE=(--device cpu --dtype fp32)
    QUICK=(--depth 1 --limit 1 --repeats 1 --warmup 0)
    COMPILE=(--compile --compile-backend eager)
    PYTEST_MODE=(--collect-only)
else
    DEVICE=(--device cuda --dtype bf16)
    QUICK=(--repeats 3 --warmup 1)
    COMPILE=(--compile)
    PYTEST_MODE=()
    INSTALL_MODE=()
fi

: >"$SUMMARY"
note "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $DRY_RUN -eq 1 ] && echo ' (dry run: wiring only, nothing timed)')"
note ""
{
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
else:
    print("torch sees no CUDA device")
for name in ("flash_attn", "torchvision", "onnxruntime", "transformers", "segment_anything"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
        print(f"{name}: not installed")
EOF
} >"$RAW/environment.txt" 2>&1
sed 's/^/    /' "$RAW/environment.txt" | tee -a "$SUMMARY"
note ""
if [ $DRY_RUN -eq 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "torch sees no CUDA device: run this on a GPU machine, or pass --dry-run to check the wiring"
    exit 1
fi

note "## Steps"
# Offline and without dependencies: a GPU machine has torch already and often no registry.
step install 20 "$PYTHON" -m pip install --quiet "${INSTALL_MODE[@]}" --no-deps --no-index --no-build-isolation -e .
step cuda-tests 60 "$PYTHON" -m pytest -q -p no:cacheprovider "${PYTEST_MODE[@]}" \
    --junitxml="$RAW/cuda-tests.xml" tests/test_cuda.py tests/test_attention.py tests/test_kernel_contracts.py

# Benchmark rows, most important first: NAME then benchmark.py arguments.
ROWS=(
    "seg512|--host eva02_b_seg --size 512 --setting segmentation"
    "det1024|--host eva02_b_det --size 1024 --setting detection"
    "det1536|--host eva02_l_det --size 1536 --setting detection"
)
for compiled in 0 1; do
    for row in "${ROWS[@]}"; do
        name=${row%%|*}
        read -r -a args <<<"${row#*|}"
        extra=()
        need=45
        if [ $compiled -eq 1 ]; then
            name="$name-compiled"
            extra=("${COMPILE[@]}")
            need=90
        fi
        [ $DRY_RUN -eq 1 ] && need=5
        # --scales 0 1: merging off (every threshold 0) and the paper's thresholds.
        step "bench-$name" "$need" "$PYTHON" tools/benchmark.py "${args[@]}" --scales 0 1 "${DEVICE[@]}" "${QUICK[@]}" \
            "${extra[@]}" --output-dir "$RAW" --tag "bench-$name"
    done
done

note ""
note "## Benchmark tables"
for table in "$RAW"/bench-*.md; do
    [ -e "$table" ] || continue
    note ""
    note "### $(basename "$table" .md)"
    cat "$table" >>"$SUMMARY"
done
note ""
note "total $(( $(date +%s) - START ))s of a ${BUDGET}s budget; raw results in $RAW"
tar -czf "$OUTPUT/gpu_check.tar.gz" -C "$OUTPUT" summary.md raw
echo "results: $OUTPUT (summary.md, gpu_check.tar.gz)"
exit $FAILED
