#!/usr/bin/env bash
# GPU check of this release in one call: the CUDA tests, the component, training-step,
# augmentation and end-to-end pretraining benchmarks, and a short bf16 benchmark run of
# msn. Writes every output to $OUT (default: gpu-check-out/).
#
# Usage, from the repository root on a machine with a GPU and the project's
# dependencies installed:
#
#     DATA_DIR=/path/to/cifar10-imagefolder bash benchmarks/gpu_check.sh
#
# DATA_DIR is CIFAR-10 as an ImageFolder with train/ and test/ (the whole train split:
# the end-to-end benchmark trains batches of 1,024 images; `tar -xzf
# cifar10-jpg.tar.gz` of the shared data gives it); without it the end-to-end and
# benchmark runs are skipped. Each step has its own time limit, so one slow step cannot
# eat the others' time, and the limits add up to under 8 minutes: the whole test suite is not
# run here (it runs on the CPU machines; only its CUDA tests are GPU-specific).
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NOISE="USDT|SyncActivity|STAGE:|UserWarning|DeprecationWarning|warnings.warn|_warn_once"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the output
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout -s KILL "$seconds" "$@" 2>&1 | grep -v -E "$NOISE" | tee "$OUT/$name.txt" | tail -30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step versions 10 python3 -c "import torch, torchvision, timm, pytorch_lightning, lightly, faiss; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'pytorch_lightning', pytorch_lightning.__version__, 'lightly', lightly.__version__, 'faiss', faiss.__version__)"
cat "$OUT/versions.txt" >> "$OUT/gpu.txt"
step test_cuda 70 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py \
    tests/test_device_transforms.py tests/test_device_data.py -k "cuda or gpu"
step perf_components 35 python3 benchmarks/perf_components.py --device cuda --repeats 10
step perf_train_step_1024 50 python3 -m benchmarks.perf_train_step --device cuda --batch-size 1024 --repeats 5
step perf_device_transforms 50 python3 -m benchmarks.perf_device_transforms --device cuda --repeats 3
if [ -n "${DATA_DIR:-}" ]; then
    step perf_pretrain 200 python3 -m benchmarks.perf_pretrain --device cuda --rounds 3 \
        --warmup 2 --steps 8 \
        --data-dir "$DATA_DIR" --jpeg-folder "$OUT/cifar10-224"
    step bench 60 python3 -m benchmarks.run --profile cpu-quick --methods msn \
        --name gpu-check --results-dir "$OUT/runs" --no-progress --set trainer.accelerator=gpu \
        trainer.precision=bf16-mixed trainer.max_epochs=2 data.train_subset=2560 \
        benchmark.bank_subset=3000 benchmark.test_subset=1000 "data.data_dir=$DATA_DIR" \
        data.num_workers=8 benchmark.monitor_bank=1000 benchmark.monitor_test=500
fi
echo "outputs in $OUT"
