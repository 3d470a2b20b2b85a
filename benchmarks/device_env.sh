# Sourced at the start of a device command: unbuffered output, and compile caches kept in ignored
# folders of the working tree so a warm machine reuses them between calls.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR="$PWD/.inductor" TRITON_CACHE_DIR="$PWD/.triton"
export OUT=${OUT:-out}; mkdir -p "$OUT"
