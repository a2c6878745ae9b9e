# Sourced by the bench/*_gpu.sh and multi_gpu.sh scripts on the device machine:
#   W=/tmp/work source bench/gpu_setup.sh
# installs the carried wheels (.whl; .whl_pa when the machine's pyarrow is older than datasets needs),
# sets the environment (NVLink multicast off), prepares the shipped HH data under $W/data and random-init
# config-A-width models: $W/lm (causal LM) and $W/rm (reward model), one 8k BPE tokenizer.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_pa/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$W"
python3 recipes/download_and_process.py --source default --output-dir "$W/data" > /dev/null
python3 - <<PY
from rlhf_kit.tiny import save_tiny_pretrained, train_tokenizer
tok = train_tokenizer(vocab_size=8192)
kw = dict(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=8, intermediate_size=2816, max_positions=2048)
save_tiny_pretrained("$W/lm", "causal_lm", tokenizer=tok, **kw)
save_tiny_pretrained("$W/rm", "reward", tokenizer=tok, seed=1, **kw)
PY
