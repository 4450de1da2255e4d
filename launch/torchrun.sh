#!/usr/bin/env bash
# Launch `mim fit` with torchrun on one node or several (run this script once on every node).
#
#   launch/torchrun.sh -c RECIPE.yaml [-c recipes/_base/ddp.yaml ...] [--trainer.max_steps 100 ...]
#
# Environment (defaults in brackets):
#   NNODES         number of nodes [1]
#   NODE_RANK      this node's rank, 0 .. NNODES-1 [0]
#   MASTER_ADDR    address of node 0, reachable from every node [127.0.0.1]
#   MASTER_PORT    a free TCP port on node 0 [29500]
#   GPUS_PER_NODE  processes per node [the number of GPUs nvidia-smi lists, else 1]
#   PYTHON         the Python that has mim installed [python]
#
# Two nodes with 8 GPUs each:
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh -c recipes/mae/vit_b16_in1k.yaml
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh -c recipes/mae/vit_b16_in1k.yaml
#
# Lightning needs trainer.num_nodes and trainer.devices to match torchrun's world. They are inserted right after
# the last -c/--config file, so they override the recipes but an explicit --trainer.devices / --trainer.num_nodes
# later on the command line still wins (jsonargparse applies arguments in order: the last one wins).
# Without a GPU the recipe's `accelerator: auto` (or cpu) and DDP run on gloo.
set -euo pipefail

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    GPUS_PER_NODE=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    fi
    ((GPUS_PER_NODE > 0)) || GPUS_PER_NODE=1
fi

# Split the arguments after the last config file: recipes ... [our world size] ... the user's later overrides.
args=("$@")
split=0
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        -c | --config) split=$((i + 2)) ;;
        --config=*) split=$((i + 1)) ;;
    esac
done
((split <= ${#args[@]})) || split=${#args[@]}
world=(--trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE")

echo "launch/torchrun.sh: node ${NODE_RANK}/${NNODES}, ${GPUS_PER_NODE} processes per node, rendezvous ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m mim fit "${args[@]:0:split}" "${world[@]}" "${args[@]:split}"
