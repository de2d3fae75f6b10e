#!/usr/bin/env bash
# GPU check of this release in one call: the CUDA tests, the whole test suite, the
# component, training-step and augmentation benchmarks, and a short bf16 benchmark run
# of msn and msn_lightly. Writes every output to $OUT (default: gpu-check-out/).
#
# Usage, from the repository root on a machine with a GPU and the project's
# dependencies installed:
#
#     DATA_DIR=/path/to/cifar10-imagefolder bash benchmarks/gpu_check.sh
#
# DATA_DIR is a CIFAR-10 ImageFolder with train/ and test/ (a few thousand images
# are enough); without it the benchmark run is skipped. Each step has its own time
# limit, so one slow step cannot eat the others' time.
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NOISE="USDT|SyncActivity|STAGE:|UserWarning|warnings.warn|_warn_once"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the output
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" 2>&1 | grep -v -E "$NOISE" | tee "$OUT/$name.txt" | tail -30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, pytorch_lightning, lightly, faiss; print('torch', torch.__version__, 'timm', timm.__version__, 'pytorch_lightning', pytorch_lightning.__version__, 'lightly', lightly.__version__, 'faiss', faiss.__version__)" | tee -a "$OUT/gpu.txt"
step test_cuda 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step test_suite 300 python3 -m pytest -q -p no:cacheprovider -rf tests -k "not docs_build"
step probe 90 python3 benchmarks/results/gpu-check-h200/probe.py
step perf_components 120 python3 benchmarks/perf_components.py --device cuda --repeats 30
step perf_train_step 150 python3 -m benchmarks.perf_train_step --device cuda --batch-size 256 --repeats 10
step perf_train_step_1024 150 python3 -m benchmarks.perf_train_step --device cuda --batch-size 1024 --repeats 10
step perf_transforms 150 python3 benchmarks/perf_transforms.py --device cuda --repeats 5 --batch 1024
step perf_device_transforms 240 python3 -m benchmarks.perf_device_transforms --device cuda --repeats 5
if [ -n "${DATA_DIR:-}" ]; then
    step bench 300 python3 -m benchmarks.run --profile cpu-quick --methods msn,msn_lightly \
        --name gpu-check --results-dir "$OUT/runs" --no-progress --set trainer.accelerator=gpu \
        trainer.precision=bf16-mixed trainer.max_epochs=3 data.train_subset=2560 \
        benchmark.bank_subset=3000 benchmark.test_subset=1000 "data.data_dir=$DATA_DIR" \
        data.num_workers=8 benchmark.monitor_bank=1000 benchmark.monitor_test=500
fi
echo "outputs in $OUT"
