#!/usr/bin/env bash
# Training across nodes: run this once on every node, with the same NUM_NODES, GPUS_PER_NODE, MAIN_ADDR,
# MAIN_PORT and BACKEND, and its own NODE_RANK (0 on the node at MAIN_ADDR). Under SLURM: launch/slurm.sbatch.
#   NUM_NODES=2 GPUS_PER_NODE=8 NODE_RANK=0 MAIN_ADDR=10.0.0.1 launch/multinode.sh --config configs/<experiment>.yaml
#   BACKEND=zero2 NUM_NODES=2 GPUS_PER_NODE=8 NODE_RANK=1 MAIN_ADDR=10.0.0.1 launch/multinode.sh --config ...
# BACKEND: ddp (default), zero2 or zero3 (DeepSpeed with launch/deepspeed_zero{2,3}.json). DeepSpeed starts
# through torchrun on each node (--deepspeed_multinode_launcher standard): no pdsh, no ./.deepspeed_env.
# DEVICE=cpu runs the same on CPU processes (gloo), e.g. two "nodes" on one machine with MAIN_ADDR=127.0.0.1.
# MODULE: the entry point (default distributed_asac.finetune; distributed_asac.demo for the comparison over seeds).
# Every node needs the same code and environment, and output_dir (and data.cache_dir) on a file system that every
# node mounts at the same path: every rank checks that before training (docs/distributed.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${NUM_NODES:?set NUM_NODES}" "${GPUS_PER_NODE:?set GPUS_PER_NODE}" "${NODE_RANK:?set NODE_RANK}" "${MAIN_ADDR:?set MAIN_ADDR}"
backend=${BACKEND:-ddp}
case "$backend" in
  ddp)
    distributed=(--multi_gpu)
    if [ "${DEVICE:-gpu}" = cpu ]; then
      export ACCELERATE_USE_CPU=true  # gloo; without it --multi_gpu on CPU starts processes that never talk
    fi ;;
  zero2|zero3)
    # Not ACCELERATE_USE_CPU: it makes Accelerate drop DeepSpeed silently (on CPU the code picks gloo itself).
    unset ACCELERATE_USE_CPU
    distributed=(--use_deepspeed --deepspeed_config_file "$here/deepspeed_${backend}.json" --zero3_init_flag false
                 --deepspeed_multinode_launcher standard) ;;
  *)
    echo "error: BACKEND=$backend is not one of ddp, zero2, zero3; set BACKEND=ddp (or zero2, zero3)" >&2
    exit 2 ;;
esac
exec accelerate launch \
  "${distributed[@]}" \
  --num_machines "$NUM_NODES" \
  --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
  --machine_rank "$NODE_RANK" \
  --main_process_ip "$MAIN_ADDR" \
  --main_process_port "${MAIN_PORT:-29500}" \
  --rdzv_backend static \
  --same_network \
  --mixed_precision no \
  ${ACCELERATE_EXTRA:-} \
  -m "${MODULE:-distributed_asac.finetune}" "$@"
