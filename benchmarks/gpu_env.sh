# Source this on the GPU machine (repo root) before running benchmarks:
#   . benchmarks/gpu_env.sh
# Installs the wheels in .whl (omegaconf, beartype, ftfy, wcwidth, av: what
# the image lacks for SCAIL's import chain and our video I/O) and scail-win
# itself (with its startup hook) into the image's Python, and points
# SCAIL_ROOT at the SCAIL tree in .scail.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir .
export SCAIL_ROOT="$PWD/.scail" PYTHONUNBUFFERED=1 OUT="${OUT:-$PWD/bench_out}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m scail_win hook | head -3
