#!/usr/bin/env bash
# Every check that needs a GPU, in one run of about five minutes, for a session lent one for a short time
# (doc/performance.md says how to send the data with it):
#
#     bash tools/gpu_checks.sh DATA_ROOT OUT_DIR
#
# DATA_ROOT is an MVTec-layout root holding the category (bottle by default); the results go to OUT_DIR:
#   cuda_tests.txt             the tests that need a CUDA device (tests/test_cudagraphs.py: the augmentation's
#                              CUDA graph)
#   benchmark_cuda.md          tools/benchmark.py, 3-way, 256 px, batch 32: the issue's H200 target, ours against
#                              the reference in the same run, the step in plain float32 NCHW, pipeline efficiency,
#                              the step's FLOP/s, evaluation
#   benchmark_cuda_eager.md    the same on random images with the augmentation launched kernel by kernel
#                              (--no-cuda_graph), ours only: what the CUDA graph saves
#   benchmark_cuda_compile.md  the same step under torch.compile, on random images, ours only
#   inference_cuda.md          tools/bench_inference.py: the scoring graph per memory format and precision, images/s
#                              at 256 px and at the 64 px patches, and seconds per dense stride-4 map
#   train_eval_cuda.txt        run_training.py (3-way, from scratch) and eval.py on the category: steps per
#                              second and the image AUROC of a whole run on the GPU
#   log.txt                    everything printed, with the versions of Python, torch, the GPU and CUDA
# A failing check does not stop the others; the exit status says whether any failed.
# The environment can shrink it for a smoke run on the CPU: DEVICE, CATEGORY, SIZE, STEPS, WARMUP, REPEATS,
# TRAIN_STEPS, LOC_IMAGES, PYTHON, and COMPILE=0 skips the compiled step.
set -uo pipefail
data=${1:?usage: bash tools/gpu_checks.sh DATA_ROOT OUT_DIR}
out=${2:?usage: bash tools/gpu_checks.sh DATA_ROOT OUT_DIR}
device=${DEVICE:-cuda}
category=${CATEGORY:-bottle}
size=${SIZE:-256}
# Timed steps per measurement: a CUDA step takes milliseconds, so many more than the CPU's 5; medians of 30 steps
# differ by about 2 % between H200 runs of the same step, more than the efficiency target's margin.
steps=${STEPS:-100}
warmup=${WARMUP:-10}            # untimed steps first: cuDNN's autotuner tries its algorithms in the first ones
repeats=${REPEATS:-3}           # evaluation timings are medians of this many runs
train_steps=${TRAIN_STEPS:-1000}
python=${PYTHON:-python3}
if [[ ! -d $data ]]; then
    echo "error: no data folder $data; give the MVTec-layout root that holds $category/" >&2
    exit 2
fi
mkdir -p "$out"
data=$(cd "$data" && pwd) out=$(cd "$out" && pwd)  # absolute, as the scripts run from the repository root
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
failed=()

check() {  # check NAME FILE COMMAND...: run the command, its output to FILE and the log; note a failure
    local name=$1 file=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/log.txt"
    if ! "$@" 2>&1 | tee -a "$out/log.txt" >"$file"; then
        failed+=("$name")
        echo "== $name FAILED" | tee -a "$out/log.txt"
    fi
}

check versions "$work/versions.txt" "$python" -c "import platform, torch, torchvision
print('python', platform.python_version(), 'torch', torch.__version__, 'torchvision', torchvision.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())"
check cuda_tests "$out/cuda_tests.txt" "$python" -m pytest -q -p no:cacheprovider tests/test_cudagraphs.py
check benchmark "$work/benchmark.txt" "$python" tools/benchmark.py --device "$device" --variant 3way \
    --size "$size" --data_dir "$data" --type "$category" --steps "$steps" --warmup "$warmup" \
    --eval_repeats "$repeats" --out "$out/benchmark_cuda.md"
check eager "$work/eager.txt" "$python" tools/benchmark.py --device "$device" --variant 3way --size "$size" \
    --steps "$steps" --warmup "$warmup" --no-cuda_graph --no-reference --out "$out/benchmark_cuda_eager.md"
check inference "$work/inference.txt" "$python" tools/bench_inference.py --device "$device" --size "$size" \
    --out "$out/inference_cuda.md"
check train "$work/train.txt" "$python" run_training.py --data_dir "$data" --type "$category" --variant 3way \
    --epochs "$train_steps" --size "$size" --no-pretrained --device "$device" --model_dir "$work/models" \
    --log_dir "$work/logs"
check eval "$work/eval.txt" "$python" eval.py --data_dir "$data" --type "$category" --model_dir "$work/models" \
    --out_dir "$work/Eval" --device "$device" --save_plots 0
cat "$work/train.txt" "$work/eval.txt" >"$out/train_eval_cuda.txt"
# Last, as compiling can fail where the other checks ran: Triton and the compiler differ from machine to machine.
if [[ ${COMPILE:-1} != 0 ]]; then
    check compile "$work/compile.txt" "$python" tools/benchmark.py --device "$device" --variant 3way \
        --size "$size" --steps "$steps" --warmup "$warmup" --compile --no-reference \
        --out "$out/benchmark_cuda_compile.md"
fi

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" | tee -a "$out/log.txt"
    exit 1
fi
echo "all checks passed" | tee -a "$out/log.txt"
