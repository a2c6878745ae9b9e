#!/usr/bin/env bash
# GRPO on the GPU machine, in one call (< 10 minutes; see bench/README.md and docs/benchmarks.md):
# TRL 1.16 GRPOTrainer, our GRPO and our PPO on bench config A (64 prompts x 4 samples, 128 new tokens),
# each system in its own process, then our GRPO with the speed switches. Wheels: .whl/ (TRL 1.16 + datasets,
# dill, multiprocess), .whl_pa/ (pyarrow, only when the machine's is older than datasets needs).
#   device call, carry [".whl"]:   bash bench/grpo_gpu.sh
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
W=/tmp/grpo_work source bench/gpu_setup.sh
export TRL_EXPERIMENTAL_SILENCE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate, datasets, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)"
G="python3 bench/grpo_vs_trl.py --batch 64 --k 4 --steps ${STEPS:-6} --warmup 2 --trl-site /tmp/site --timeout 240 --work /tmp/grpo_work/bench"
FAST="--compile-blocks --master-weights --keep-cache"
PARTS=${PARTS:-default fast fast_micro64 fast_recompute}  # one call may not hold all four: PARTS="default fast"
for part in $PARTS; do
  case $part in
    # TRL and ours with the library defaults (the actor's scoring pass skipped: one optimizer step per rollout)
    default) $G --systems trl ours_grpo --out "$OUT/$part" 2>&1 | tail -8 ;;
    # the speed switches, and our PPO with the same switches (what the critic costs)
    fast) $G --systems ours_grpo ours_ppo $FAST --out "$OUT/$part" 2>&1 | tail -6 ;;
    # larger training micro-batches; the old log-probs recomputed (what the skip saves)
    fast_micro64) $G --systems ours_grpo $FAST --micro 64 --out "$OUT/$part" 2>&1 | tail -4 ;;
    fast_recompute) $G --systems ours_grpo $FAST --recompute-old-logprobs --out "$OUT/$part" 2>&1 | tail -4 ;;
    # memory: the KV cache released between steps (--keep-cache off), and smaller training micro-batches
    nokeep) $G --systems trl ours_grpo --compile-blocks --master-weights --out "$OUT/$part" 2>&1 | tail -6 ;;
    nokeep_micro8) $G --systems ours_grpo --compile-blocks --master-weights --micro 8 --out "$OUT/$part" 2>&1 | tail -4 ;;
  esac
done
for d in $PARTS; do echo "== $d"; cat "$OUT/$d/grpo_vs_trl.md" 2>/dev/null; done
