#!/usr/bin/env bash
# Issue 23's GPU checks and measurements in one run (BENCHMARKS.md, section 9; none of them has run on a GPU
# yet, so the durations are estimates): host synchronisations per minibatch under CUDA's sync debug mode,
# the ASAC step at k = 64 and 256 with the compiled, fixed-chunk and bf16 variants beside the default, then sweep
# throughput at 1, 4 and 8 trials per GPU. Tables go to stdout, JSON to ${OUT:-out}/issue23/.
#   bash benchmarks/gpu_issue23.sh            (from the repository root, in the project's environment)
set -euo pipefail
out="${OUT:-out}/issue23"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m pytest -q tests/test_host_syncs.py -k gpu  # expected: 8 passed (plain, adv_augment 0 syncs, ASAC 1, fixed chunks 0)
for k in 64 256; do  # ~1.5 min each, the compiled variant's compilation included
  python benchmarks/bench_step.py --backbones resnet18 --image-size 128 --batch-size "$k" --threads 16 \
    --variants compiled fixed_chunks bf16_autocast --repeats 10 --variant-repeats 10 --json "$out/step_k$k.json"
done
# 12 trials (3 settings x 4 seeds) of the smoke sweep per count, one round: ~1-2 min per count
python benchmarks/bench_layout.py --sweep configs/sweeps/smoke.yaml --per-device 1 4 8 --seeds 0 1 2 3 \
  --processes 16 --repeats 1 --json "$out/packing.json"
