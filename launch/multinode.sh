#!/usr/bin/env bash
# Multi-node DDP: run this on every node with the same MAIN_ADDR/MAIN_PORT and its own NODE_RANK.
#   NUM_NODES=2 GPUS_PER_NODE=8 NODE_RANK=0 MAIN_ADDR=10.0.0.1 launch/multinode.sh --config configs/<experiment>.yaml
# Add `--use_deepspeed --deepspeed_config_file launch/deepspeed_zero2.json` to ACCELERATE_EXTRA for ZeRO-2.
# Every node needs the same code, environment and data.root (a shared filesystem or identical copies).
set -euo pipefail
: "${NUM_NODES:?set NUM_NODES}" "${GPUS_PER_NODE:?set GPUS_PER_NODE}" "${NODE_RANK:?set NODE_RANK}" "${MAIN_ADDR:?set MAIN_ADDR}"
exec accelerate launch \
  --multi_gpu \
  --num_machines "$NUM_NODES" \
  --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
  --machine_rank "$NODE_RANK" \
  --main_process_ip "$MAIN_ADDR" \
  --main_process_port "${MAIN_PORT:-29500}" \
  --rdzv_backend static \
  --mixed_precision no \
  ${ACCELERATE_EXTRA:-} \
  -m distributed_asac.finetune "$@"
