# Sourced by the GPU check scripts: installs the carried wheels of .whl/ (the GPU image lacks
# them and has no internet), sets $out (logs; $OUT when set, else ./gpu-logs) and records the device.
set -uo pipefail
out=${OUT:-gpu-logs}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
