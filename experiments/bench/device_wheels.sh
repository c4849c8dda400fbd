#!/usr/bin/env bash
# Fetches, into .whl/ (git-ignored), the wheels the H100/H200 image lacks for experiments/bench.py:
# ml-collections (configs; the step benchmark needs only this) and grain with array-record and
# portpicker (the pipeline benchmark). Versions are the pinned ones of requirements.txt; the image
# already has absl-py, PyYAML, cloudpickle, etils, numpy and protobuf (/work/.library/device/KINDS.md).
# Written without a device lent; the CPU check was that bench.py's step benchmark imports and runs
# with grain, clu, TensorFlow and TFDS made unimportable.
#
# Then, per device run (carry ".whl"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
#   python3 experiments/bench.py --config=configs/dino.py --steps=20 --config.batch_size=256 \
#       --config.data.local_crops.number=10
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
for name in ml-collections grain array-record portpicker; do
  p=$(grep -i "^${name}==" requirements.txt | head -1 || true)
  [ "$name" = portpicker ] && p=${p:-portpicker==1.6.0}  # grain's dependency, not pinned by us
  [ -n "$p" ] || { echo "${name} is not pinned in requirements.txt" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$p"
done
ls -la .whl
