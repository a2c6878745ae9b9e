#!/usr/bin/env bash
# Issue 8 on a multi-GPU kind, in one device call: the RM and PPO recipes on 1 GPU and under FSDP2 on N
# GPUs with the same global batch, config A's architecture (random init, 8k BPE). Results under $OUT.
#   bash bench/multi_gpu.sh [N]      (carry .whl: tyro, docstring_parser, typeguard, datasets, dill, multiprocess)
set -u
N=${1:-2}
OUT=${OUT:-multi_gpu_out}; W=/tmp/mg; mkdir -p "$OUT" $W
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
L1="accelerate launch --config_file recipes/accelerate/single.yaml"
LN="accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes $N"
RM="recipes/reward_model.py --model $W/lm --train-data $W/data/train_comparisons.jsonl --test-data $W/data/test_comparisons.jsonl
    --max-length 512 --lr 1e-5 --max-steps 20 --global-batch-size 64 --val-check-interval 1000 --save-interval 1000 --mixed-precision bf16"
PPO="recipes/ppo.py --actor $W/lm --reward-model $W/rm --train-prompts $W/data/train_prompts.jsonl --val-prompts $W/data/test_prompts.jsonl
    --backend compiled --num-rollout-samples 64 --global-batch-size 64 --micro-batch-size 16 --rollout-micro-batch-size 32
    --max-new-tokens 64 --max-steps 6 --val-check-interval 1000 --save-interval 1000 --actor-lr 1e-6 --actor-min-lr 1e-7
    --critic-lr 1e-5 --critic-min-lr 1e-6 --mixed-precision bf16"
run() { local name=$1 limit=$2; shift 2; local t0=$(date +%s.%N)
  timeout $limit "$@" > $W/$name.log 2>&1; local rc=$?; local t1=$(date +%s.%N)
  echo "$name rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))")s" | tee -a "$OUT/runs.txt"; tail -5 $W/$name.log | cut -c1-300 >> "$OUT/tails.txt"; }
run rm_1gpu 150 $L1 $RM --micro-batch-size 16 --output-dir $W/rm1
run rm_${N}gpu 150 $LN $RM --micro-batch-size $((64 / N / 2)) --output-dir $W/rmN
run ppo_1gpu 170 $L1 $PPO --output-dir $W/ppo1
run ppo_${N}gpu 170 $LN $PPO --output-dir $W/ppoN
# TP=N generation refit from the FSDP2 layout vs one GPU with the same weights (fp32 greedy)
timeout 300 torchrun --nproc_per_node $N bench/tp_generation.py --out "$OUT/tp_generation.json" > $W/tp.log 2>&1
echo "tp_generation rc=$?" | tee -a "$OUT/runs.txt"; tail -3 $W/tp.log | cut -c1-300 >> "$OUT/tails.txt"
python3 - <<PY | tee "$OUT/summary.md"
import json, os
def rows(d):
    p = os.path.join("$W", d, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
def col(rs, k): return [round(r[k], 4) if isinstance(r[k], float) else r[k] for r in rs if k in r]
out = {}
for d in ("rm1", "rmN"):
    out[d] = {"train/loss": col(rows(d), "train/loss"), "train/accuracy": col(rows(d), "train/accuracy")}
for d in ("ppo1", "ppoN"):
    rs = rows(d)
    out[d] = {k: col(rs, k) for k in ("reward/score_mean", "kl/seq_mean", "value/loss", "policy/loss",
              "time/generate", "time/score", "time/train", "throughput/generated_tokens_per_s")}
json.dump(out, open("$OUT/summary.json", "w"), indent=1)
for d, v in out.items():
    print(f"## {d}")
    for k, xs in v.items(): print(f"- {k}: {xs}")
PY
