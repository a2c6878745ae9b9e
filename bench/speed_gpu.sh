#!/usr/bin/env bash
# One device call for issue 18's generation and start-up work (carry .whl): the decode-attention variants
# of CompiledBackend (with cuDNN's SDPA on, and off as the recipes run), the PPO recipe's cold and warm
# start (with bench/startup_timeline.py's marks), PPO config A against TRL 1.12 (stage ppo_a: carry .whl112
# too) and PPO config B's train-phase MFU. Everything lands in $OUT/speed.tgz (one file comes back).
#   STAGES="attn nocudnn warm mfu_b" bash bench/speed_gpu.sh
set -u
FINAL=${OUT:-speed_out}; R=/tmp/speed_results; rm -rf "$R"; mkdir -p "$R" "$FINAL"
export OUT=$R PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD   # (the warm stage's bench/warm_start_gpu.sh runs bench/gpu_setup.sh itself)
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic_speed
STAGES=${STAGES:-attn nocudnn warm mfu_b}
ATTN="compiled_graphs compiled_graphs_sdpa"   # (call 2, 2026-12-04: the default was sdpa, matmul its own variant, and a third, reduce)
for stage in $STAGES; do
  t0=$(date +%s)
  case $stage in
    attn) timeout 200 python3 bench/generation.py --configs A 1B --only $ATTN --profile --out $R/gen_attn > $R/gen_attn.log 2>&1 ;;
    fused) timeout 200 python3 bench/generation.py --configs A 1B --only compiled_graphs compiled_graphs_unfused --no-cudnn \
             --profile --out $R/gen_fused > $R/gen_fused.log 2>&1 ;;
    ppo_a_ours) timeout 200 python3 bench/ppo_vs_trl.py --configs A --keep-cache --compile-blocks --master-weights \
             --systems ours --timeout 190 --out $R/ppo_a_ours > $R/ppo_a_ours.log 2>&1 ;;
    nocudnn) timeout 150 python3 bench/generation.py --configs A 1B --only $ATTN --no-cudnn --out $R/gen_nocudnn > $R/gen_nocudnn.log 2>&1 ;;
    warm) OUT=$R/warm_start RUNS="default_cold default_warm" timeout 220 bash bench/warm_start_gpu.sh > $R/warm.log 2>&1 ;;
    ppo_a) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site112 .whl112/*.whl
           timeout 300 python3 bench/ppo_vs_trl.py --configs A --keep-cache --compile-blocks --master-weights \
             --systems trl ours --trl-site /tmp/site112 --timeout 200 --out $R/ppo_a > $R/ppo_a.log 2>&1 ;;
    mfu_b) timeout 200 python3 bench/ppo_vs_trl.py --configs B --systems ours --keep-cache --compile-blocks \
             --master-weights --timeout 190 --out $R/mfu_b > $R/mfu_b.log 2>&1 ;;
  esac
  echo "stage $stage rc=$? $(( $(date +%s) - t0 ))s" | tee -a $R/stages.txt
done
for f in $R/gen_fused/generation.md $R/ppo_a_ours/*.md $R/gen_attn/generation.md $R/gen_nocudnn/generation.md $R/warm_start/warm_start.md $R/mfu_b/*.md $R/ppo_a/*.md; do
  [ -f "$f" ] && { echo "== $f"; cat "$f"; }
done
tar czf "$FINAL/speed.tgz" -C "$R" .
