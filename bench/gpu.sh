#!/usr/bin/env bash
# The benches on a CUDA GPU (issue 6: step time, tokens per second and real-time factor in bf16),
# one JSON file per bench in $OUT (default bench-gpu/).
#
#   bash bench/gpu.sh prepare   # here, with the package index and ../shared: fills .gpu/ (ignored by git)
#   bash bench/gpu.sh           # on the GPU machine, with .gpu/ carried along: ~5 min
#
# .gpu/model holds the VoxCPM1.5 config and tokenizer (../shared does not travel to the GPU machine);
# .gpu/wheels the dependencies a GPU image with torch may lack (Python 3.12, manylinux x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    mkdir -p .gpu/model .gpu/wheels
    cp ../shared/models/VoxCPM1.5/*.json .gpu/model/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels pydantic pydantic-core annotated-types typing-inspection typing-extensions \
        soundfile cffi pycparser soxr
    du -sh .gpu
    exit 0
fi

[ -d .gpu/model ] || { echo "bench/gpu.sh: no .gpu/: run 'bash bench/gpu.sh prepare' here first and carry .gpu" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/voxcpm-site .gpu/wheels/*.whl
export PYTHONPATH="$PWD:/tmp/voxcpm-site" PYTHONUNBUFFERED=1
out="${OUT:-bench-gpu}"
mkdir -p "$out"
model=.gpu/model
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
python3 bench/machine.py --device cuda --seconds 0.3 > "$out/machine.json"
python3 bench/train.py --device cuda --config "$model/config.json" --machine-seconds 0.3 > "$out/train.json"
python3 bench/infer.py --device cuda --model-dir "$model" --seconds 10 --machine-seconds 0.3 > "$out/infer.json"
python3 bench/data.py --device cuda --config "$model/config.json" --clips 32 --batch-clips 1 16 \
    --machine-seconds 0.3 > "$out/data.json"
ls -l "$out"
