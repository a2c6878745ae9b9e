#!/usr/bin/env bash
# bench/real_model.py on the GPU machine with SmolLM2-135M-Instruct carried as a split GGUF file.
# The 98 MB GGUF exceeds one call's transfer limit, so it travels in two calls while the machine stays warm:
#   split -b 49M SmolLM2-135M-Instruct.Q4_1.gguf .gguf/part_     (here; .gguf/ is git-ignored)
#   call 1: carry .whl and .gguf/part_aa:  bash bench/real_model_gpu.sh          (stores the part)
#   call 2: carry .whl and .gguf/part_ab:  STAGES=data,rm_ours,rm_trl bash bench/real_model_gpu.sh
#   call 3: carry .whl:                    STAGES=ppo,eval bash bench/real_model_gpu.sh
#   RM speed sweep (bench/rm_speed.py) once the model is there: SWEEP=all bash bench/real_model_gpu.sh
#   RM flags for the rm_ours stage: RM_ARGS="--gradient-checkpointing --micro-batch-tokens 16384" ...
# Wheels in .whl: trl, datasets, dill, multiprocess, tyro, docstring-parser, typeguard, gguf (cp312).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=/tmp/real; mkdir -p "$W"
if [ ! -f "$W/site.ok" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch "$W/site.ok"
fi
export PYTHONPATH=/tmp/site:$PWD
for p in .gguf/part_*; do [ -f "$p" ] && cp "$p" "$W/"; done
if [ ! -d "$W/smollm2" ] && [ -f "$W/part_aa" ] && [ -f "$W/part_ab" ]; then
  cat "$W/part_aa" "$W/part_ab" > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
  md5sum "$W/SmolLM2-135M-Instruct.Q4_1.gguf"   # a1231443440b107ff29f02bdb38c9d0a
  python3 bench/gguf_to_hf.py "$W/SmolLM2-135M-Instruct.Q4_1.gguf" "$W/smollm2" 2>&1 | tail -1
fi
if [ ! -d "$W/smollm2" ]; then
  echo "model not ready yet; parts here: $(ls "$W" | tr '\n' ' ')"; nvidia-smi --query-gpu=name,memory.used --format=csv
  python3 -c "import torch, transformers, trl, tyro, datasets; print(torch.__version__, transformers.__version__, trl.__version__, tyro.__version__, datasets.__version__)"
  exit 0
fi
OUT=${OUT:-$W/out}
if [ -n "${SWEEP:-}" ]; then  # the RM speed sweep (bench/rm_speed.py): SWEEP=all or a comma-separated list
  [ -f "$W/work/data/train_comparisons.jsonl" ] || python3 recipes/download_and_process.py --source default --format messages --output-dir "$W/work/data" > /dev/null
  only=""; [ "$SWEEP" != all ] && only="--only $SWEEP"
  python3 bench/rm_speed.py --model "$W/smollm2" --data "$W/work/data" --out "$OUT/rm_speed" --steps "${SWEEP_STEPS:-30}" $only ${SWEEP_ARGS:-}
  [ -z "${STAGES:-}" ] && exit 0
fi
python3 bench/real_model.py --model "$W/smollm2" --out "$OUT" --work "$W/work" --stages "${STAGES:-data,rm_ours,rm_trl,ppo,eval}" --ppo-args="${PPO_ARGS:-}" --rm-args="${RM_ARGS:-}" ${EXTRA:-}
rc=$?
tar czf "$OUT/logs.tgz" -C "$W/work" logs 2>/dev/null
for d in rm_ours ppo; do [ -f "$W/work/$d/metrics.jsonl" ] && cp "$W/work/$d/metrics.jsonl" "$OUT/${d}_metrics.jsonl"; done
exit $rc
