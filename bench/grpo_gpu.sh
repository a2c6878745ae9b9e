#!/usr/bin/env bash
# GRPO on the GPU machine, in one call (< 9 minutes; see bench/README.md and docs/benchmarks.md):
# TRL 1.16 GRPOTrainer, our GRPO and our PPO on bench config A (64 prompts x 4 samples, 128 new tokens),
# 4 steps each (the first is warm-up), each system in its own process. Wheels: .whl/ (TRL 1.16 + datasets,
# dill, multiprocess), .whl_pa/ (pyarrow, only when the machine's is older than datasets needs).
#   device call, carry [".whl", ".whl_pa"]:   bash bench/grpo_gpu.sh
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
W=/tmp/grpo_work source bench/gpu_setup.sh
export TRL_EXPERIMENTAL_SILENCE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate, datasets, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)"
python3 bench/grpo_vs_trl.py --systems trl ours_grpo ours_ppo --batch 64 --k 4 --steps 4 --warmup 1 \
  --trl-site /tmp/site --timeout 200 --work /tmp/grpo_work/bench --out "$OUT" 2>&1 | tee "$OUT/grpo_log.txt"
cat "$OUT/grpo_vs_trl.md"
