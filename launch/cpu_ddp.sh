#!/usr/bin/env bash
# ASAC fine-tuning on N synchronised CPU processes (default 2) of this machine, with gloo.
#   launch/cpu_ddp.sh --config configs/demo.yaml finetune.epochs=1
#   NUM_PROCESSES=4 launch/cpu_ddp.sh --config ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export ACCELERATE_USE_CPU=true  # without it Accelerate starts unsynchronised processes on CPU
exec accelerate launch --config_file "$here/cpu_ddp.yaml" --num_processes "${NUM_PROCESSES:-2}" \
  -m distributed_asac.finetune "$@"
