#!/usr/bin/env bash
# The GPU runs behind experiments/bench/RESULTS.md, as one command on a device machine (an H100
# image without grain, ml-collections, clu, TFDS or TensorFlow: carry the wheels that
# experiments/bench/device_wheels.sh fetches into .whl/). Usage, from the repository root:
#   bash experiments/bench/gpu_session.sh env tests step pipeline     # any subset, in order
# Each part writes its log under $OUT (default /tmp/gpu_out); a part that fails or runs past its
# time limit is reported and the next one runs.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ -d .whl ] && ! python3 -c "import grain, ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DINO="python3 experiments/bench.py --config=configs/dino.py --config.data.local_crops.number=10"

# run NAME SECONDS CMD...: runs CMD with a time limit; its whole output is appended to
# $OUT/session.log (a device run returns at most 8 files) and its tail printed.
run() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/session.log"
  local t0=$SECONDS
  timeout "$limit" "$@" > /tmp/part.log 2>&1
  local rc=$?
  cat /tmp/part.log >> "$OUT/session.log"
  grep -v -E "^(W|I)[0-9]{4} |^WARNING: All log|^\s*$" /tmp/part.log | tail -n 25
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/session.log"
}

# profile NAME ARGS...: a step benchmark with 3 traced steps, summarised into $OUT/trace_NAME.txt.
profile() {
  local name=$1; shift
  run "$name" 240 $DINO --steps=20 --profile_dir="/tmp/prof_$name" "$@"
  python3 experiments/bench/trace_summary.py "/tmp/prof_$name" --steps=3 > "$OUT/trace_$name.txt" 2>&1
  head -n 45 "$OUT/trace_$name.txt"
}

part_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc
  python3 -c "import jax, flax, optax, numpy, PIL, grain, ml_collections; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'numpy', numpy.__version__, 'pillow', PIL.__version__, 'grain', grain.__version__); print(jax.devices())"
}

part_tests() {
  # tests/conftest.py pins the CPU unless JAX_PLATFORMS is set.
  run gpu_tests 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider \
      tests/data/test_device_crops.py \
      tests/models/test_vit_backbone.py::test_cudnn_attention_matches_explicit_on_gpu
}

part_step() {
  # ViT-S/16, 2x224 + 10x96, batch 256: the row; then what each choice costs.
  profile dino --config.batch_size=256
  profile dino_cudnn --config.batch_size=256 --config.model.attention=cudnn
  run step_host_crops 150 $DINO --steps=20 --config.batch_size=256 --config.data.crops_on=host
}

part_final() {
  # The defaults (attention 'auto' = cuDNN here, crops resampled in the step); then the model
  # alone (crops made on the host).
  run step_default 180 $DINO --steps=20 --config.batch_size=256
  run step_default_host_crops 180 $DINO --steps=20 --config.batch_size=256 --config.data.crops_on=host
}

part_recompute() {
  # LayerNorm/GELU recomputed in the backward pass (config.model.recompute_elementwise): on the
  # CPU it cuts the values the ViT-S/16 step saves for backward by about a third
  # (experiments/bench/saved_activations.py); here, its step time and memory, and whether
  # DINO's global batch of 512 then fits one card.
  profile dino_recompute --config.batch_size=256 --config.model.recompute_elementwise=true
  run step_recompute_512 240 $DINO --steps=10 --config.batch_size=512 \
      --config.model.recompute_elementwise=true
}

part_fmnist() {
  # DINO's fashion_mnist preset for 5 epochs instead of 1 (Fashion-MNIST's files carried in .fmnist).
  run fmnist_dino_5ep 260 python3 main.py --config=configs/dino.py:fashion_mnist \
      --workdir=/tmp/fmnist_dino_5ep --config.data.path=.fmnist --config.total_epochs=5 \
      --config.data.workers=8
}

part_fmnist10() {
  run fmnist_dino_10ep 270 python3 main.py --config=configs/dino.py:fashion_mnist \
      --workdir=/tmp/fmnist_dino_10ep --config.data.path=.fmnist --config.total_epochs=10 \
      --config.data.workers=8
}

part_hlo() {
  # The default step traced with its optimised HLO dumped: which ops the top kernels hold (the
  # next step for MFU; not run yet).
  XLA_FLAGS="--xla_dump_to=/tmp/hlo_dino --xla_dump_hlo_as_text" run step_hlo 240 $DINO --steps=5 \
      --config.batch_size=256 --profile_dir=/tmp/prof_hlo
  python3 experiments/bench/trace_summary.py /tmp/prof_hlo --steps=3 --top=30 \
      --hlo_dir=/tmp/hlo_dino > "$OUT/trace_hlo.txt" 2>&1
  tail -n 62 "$OUT/trace_hlo.txt"
}

part_pipeline() {
  # ImageNet-sized JPEGs, all 12 crops, boxes, iBOT masks, overlaps; the machine's cores.
  P="$DINO --what=pipeline --make_jpegs=/tmp/jpegs --num_jpegs=256 --config.batch_size=64 \
--config.data.masks.scheme=ibot"
  run pipe_device_workers 120 $P --batches=60 --workers=16
  run pipe_device672_workers 120 $P --batches=60 --workers=16 --config.data.canvas_size=672
}

part_pipeline_mix() {
  # Threads vs worker processes (2026-11-23, 2 cores: 4 threads in one process 378-424 img/s,
  # 2 workers 243-292; a worker's batch goes through fresh shared-memory pages, RESULTS.md).
  P="$DINO --what=pipeline --make_jpegs=/tmp/jpegs --num_jpegs=256 --config.batch_size=64 \
--config.data.masks.scheme=ibot --config.data.canvas_size=672"
  run pipe672_threads16 120 $P --batches=60 --workers=0 --config.data.read_threads=16
  run pipe672_w4_threads4 120 $P --batches=60 --workers=4 --config.data.read_threads=4
  run pipe672_w8_threads2 120 $P --batches=60 --workers=8 --config.data.read_threads=2
  run pipe672_w16 120 $P --batches=60 --workers=16
}

part_pipeline_host() {  # not run yet in this form (needs part_pipeline's $P first)
  run pipe_host_workers 120 $P --batches=30 --workers=16 --config.data.crops_on=host
}

for part in "$@"; do
  "part_$part"
done
