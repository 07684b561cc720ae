#!/usr/bin/env bash
# Everything a GPU run of trilora checks, in one command on the device machine:
#   1. the GPU tests (bf16 correctness of every kernel; `pytest -m gpu`),
#   2. the benchmarks, appending JSON rows to $OUT/<device>-<date>.json.
# Usage (device tool, repo root):  bash bench/gpu_check.sh [tests] [dequant] [lora] [sweep] [blocks] [train]
# With no argument it runs all parts. bitsandbytes (and liger-kernel, if wanted) travel as
# wheels in .whl/ (git-ignored; name it in `carry`): they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
parts=${*:-tests dequant lora sweep blocks train}
name=$(python3 -c "import torch, datetime; print(torch.cuda.get_device_name().replace(' ', '_') + '-' + datetime.date.today().isoformat())")
status=0
for part in $parts; do
    case $part in
        tests)   python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1 ;;
        dequant) python3 bench/bench_dequantize.py --out "$OUT/$name.json" || status=1 ;;
        lora)    python3 bench/bench_lora_linear.py --out "$OUT/$name.json" || status=1 ;;
        sweep)   python3 bench/bench_lora_linear.py --sweep --out "$OUT/$name-sweep.json" || status=1 ;;
        blocks)  python3 bench/bench_block_kernels.py --out "$OUT/$name.json" || status=1 ;;
        train)   python3 bench/bench_train_step.py --out "$OUT/$name.json" || status=1 ;;
        *) echo "unknown part $part (tests dequant lora sweep blocks train)"; status=2 ;;
    esac
done
python3 bench/report.py "$OUT/$name.json" --plots "$OUT" 2>/dev/null || true
exit $status
