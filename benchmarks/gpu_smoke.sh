#!/usr/bin/env bash
# GPU smoke benchmark on one GPU (estimated 3-5 minutes on an H100; each strategy is stopped after 150 s):
# MAE ViT-B/16 (224 px, mask 0.75, decoder 8 x 512, batch 128, bf16-mixed, synthetic uint8 images made on the
# GPU) for 300 steps under each of the strategy pieces recipes/_base/ddp.yaml, deepspeed_stage_2.yaml and
# deepspeed_stage_3.yaml, each through `mim fit` in a fresh process. Prints one row per strategy: images/s (steps after a 30-step warm-up), achieved TFLOP/s and MFU
# (58.7 GFLOP per image, vs 989.4 TFLOP/s), peak GPU memory (torch.cuda.max_memory_allocated), first and last
# loss. Records and per-run logs go to $OUT/gpu_smoke.jsonl (or --out DIR).
#
#   benchmarks/gpu_smoke.sh                               # the full run, from the repository root
#   benchmarks/gpu_smoke.sh --steps 200 --batch-size 256 --strategies ddp,deepspeed_stage_3
#   benchmarks/gpu_smoke.sh --cpu-dry-run                 # same code path on CPU: tiny model, 3 steps, ddp
#   benchmarks/gpu_smoke.sh --cpu-dry-run --strategies ddp,deepspeed_stage_2,deepspeed_stage_3 \
#       --deepspeed-class mim.distributed.DeepSpeedStrategy   # ZeRO rows on CPU through a CPU-capable subclass
#
# Needs deepspeed for the ZeRO rows (skipped, and the exit status is 1, without it). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" benchmarks/gpu_smoke.py "$@"
