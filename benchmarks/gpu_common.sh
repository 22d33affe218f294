# Shared by benchmarks/gpu_bench.sh and benchmarks/gpu_check.sh (sourced, not run): the offline
# wheels, the versions, and one run of our step (sae_jax.bench) or sparsify's
# (benchmarks/sparsify_compare.py) appended to $RESULTS as one JSON line named by its "run" (or,
# where it failed, its error lines, each after "RUN: ").
# Set before sourcing: OUT, RESULTS; optionally RUN_TIMEOUT (s), STEPS, WARMUP, SPARSIFY_DEVICE.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
SPARSIFY_DEVICE=${SPARSIFY_DEVICE:-cuda}

# sparsify and its pure-Python dependencies come from wheels in .whl/ where that folder exists
# (the GPU machine has no network; see the device README).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

versions() {
  command -v nvidia-smi > /dev/null \
    && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"
}

ours() {  # ours NAME FLAGS...
  local name=$1; shift
  timeout "$RUN_TIMEOUT" python3 -m sae_jax.bench --steps="$STEPS" --warmup="$WARMUP" "$@" 2>&1 \
    | grep '^{\|Error' | sed "s/^{/{\"run\": \"ours $name\", /; /^{/!s/^/ours $name: /" \
    | tee -a "$RESULTS"
}

theirs() {  # theirs NAME FLAGS...
  local name=$1; shift
  timeout "$RUN_TIMEOUT" python3 benchmarks/sparsify_compare.py --device="$SPARSIFY_DEVICE" \
    --steps="$STEPS" --warmup="$WARMUP" "$@" 2>&1 \
    | grep '^{\|Error' | sed "s/^{/{\"run\": \"sparsify $name\", /; /^{/!s/^/sparsify $name: /" \
    | tee -a "$RESULTS"
}
