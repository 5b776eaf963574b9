#!/bin/bash
# Multi-node training with torchrun (no SLURM): run this on every node. Lightning reads
# torchrun's variables (TorchElasticEnvironment) for ranks; rendezvous is torchrun's c10d.
#
#   NNODES=8 NODE_RANK=0 MASTER_ADDR=node0 recipes/launch/torchrun.sh recipes/faceclip-l14/pretrain.yaml
#   ... on node i: NODE_RANK=i; add --ckpt_path last to resume after a failure.
#
# NNODES must equal the recipe's trainer.num_nodes and GPUS_PER_NODE its trainer.devices.
# COMMAND=prepare runs data preparation the same way (recipes/prepare/default.yaml with
# --input, --out, --devices GPUS_PER_NODE, --num_nodes NNODES); COMMAND=cache the feature cache
# (recipes/cache/default.yaml with --recipe <fit recipe> and the same --devices / --num_nodes).
set -euo pipefail
RECIPE=${1:?usage: NNODES=N NODE_RANK=i MASTER_ADDR=host recipes/launch/torchrun.sh <recipe.yaml> [fit options]}
shift
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${GPUS_PER_NODE:=8}"
export NCCL_ASYNC_ERROR_HANDLING=1
exec .venv/bin/torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id faceclip_zoo \
  -m faceclip_zoo "${COMMAND:-fit}" --config "$RECIPE" "$@"
