#!/usr/bin/env bash
# The whole RLHF pipeline on the embedded default (tiny Llama + the shipped Anthropic HH sample), on CPU
# in a few minutes: SFT -> reward model -> PPO -> evaluation against the SFT policy, then a report
# (<output-root>/report.md: what ran, RM test accuracy, PPO validation curves, the win rate).
# Usage: bash scripts/quickstart.sh [output-root]   (default: outputs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/quickstart}
python recipes/download_and_process.py --source default --output-dir "$OUT/data"
python recipes/sft.py --output-dir "$OUT/sft" --train-data "$OUT/data/train_comparisons.jsonl" \
    --test-data "$OUT/data/test_comparisons.jsonl" --max-steps 60
python recipes/reward_model.py --model "$OUT/sft/final" --output-dir "$OUT/rm" \
    --train-data "$OUT/data/train_comparisons.jsonl" --test-data "$OUT/data/test_comparisons.jsonl" \
    --lr 1e-3 --max-length 256 --max-steps 60
python recipes/ppo.py --actor "$OUT/sft/final" --reward-model "$OUT/rm/final" --output-dir "$OUT/ppo" \
    --train-prompts "$OUT/data/train_prompts.jsonl" --val-prompts "$OUT/data/test_prompts.jsonl" \
    --max-steps 10 --actor-lr 1e-4 --actor-min-lr 1e-5 --critic-lr 1e-4 --critic-min-lr 1e-5 --val-check-interval 2 --save-interval 5
python recipes/evaluate.py --policy "$OUT/ppo/final" --baseline "$OUT/sft/final" --reward-model "$OUT/rm/final" \
    --prompts "$OUT/data/test_prompts.jsonl" --num-prompts 64 --output-dir "$OUT/eval"
python recipes/report.py --root "$OUT"
