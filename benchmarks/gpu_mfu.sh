#!/usr/bin/env bash
# GPU performance on one GPU (issue 13; about 7-8 minutes on an H200, capped by --budget 470 s): a bf16 GEMM ceiling
# (8192^3, CUDA events); FLOPs per image counted on one real step of mim's MAE and of an independent plain-PyTorch
# MAE (same weights and masks: their losses must agree), next to the analytic 58.7 / 124.5 GFLOP (ViT-B/16, ViT-L/16);
# the two in the same hand-written bf16 loop (images/s, MFU against 989.4 TFLOP/s and against the GEMM ceiling, peak
# memory), eager and torch.compile'd; `mim fit` in fresh processes for MAE ViT-B/16 and ViT-L/16 under ddp, ZeRO-2,
# ZeRO-3 and FSDP2, I-JEPA ViT-H/14 (batch 64) and HPM ViT-B/16; the framework tax (mim fit / plain loop). Prints each
# row as it finishes, then markdown tables for BENCHMARKS.md; records go to $OUT/gpu_mfu.jsonl (or --out DIR), the
# tables to gpu_mfu.md next to them, each `mim fit` log as fit_<model>_<strategy>.log.
#
#   benchmarks/gpu_mfu.sh                                    # the full run, from the repository root
#   benchmarks/gpu_mfu.sh --only gemm,flops,plain,fit        # a subset (sections: gemm,flops,plain,fit,compiled)
#   benchmarks/gpu_mfu.sh --fit-rows mae_vit_b16:ddp,mae_vit_l16:fsdp --budget 300
#   benchmarks/gpu_mfu.sh --cpu-dry-run                      # same code on CPU: tiny models, 3 steps, ddp (~20 s)
#   benchmarks/gpu_mfu.sh --cpu-dry-run --only fit --fit-rows mae_vit_b16:deepspeed_stage_3 \
#       --deepspeed-class mim.distributed.DeepSpeedStrategy  # a ZeRO row on CPU through a CPU-capable subclass
#
# Exit status 1 when a row was skipped (out of memory, time cap, failed mim fit, no deepspeed). PYTHON picks the
# interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" benchmarks/gpu_mfu.py "$@"
