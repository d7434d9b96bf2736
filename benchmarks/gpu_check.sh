#!/usr/bin/env bash
# The GPU check, one command (at most 9.5 minutes; fits one 10-minute device call): the full-size backbones (SD2 UNet,
# diffusers' UNet at the same config, DiT-XL/2) in bf16 with SDPA's default and math kernels, the demo UNet through
# Lightning (cached vs on-the-fly latents, bf16, compile, SDPA math), a short shapes autoencoder fit on the GPU, and
# last, since compiling the full-size models took over 150-230 s on the H200 of 2026-12-04, torch.compile rows.
#   bash benchmarks/gpu_check.sh [OUT_DIR]       (outputs also go to OUT_DIR, default ./gpu_check)
# Record the printed card, date and numbers in benchmarks/RESULTS.md.
set -uo pipefail
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # wheels of what a bare GPU image lacks (hydra-core, omegaconf, antlr4, webdataset, open_clip_torch, ftfy, diffusers)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$out/machine.txt"
timeout 120 python3 benchmarks/bench_backbones.py --sdpa default math 2>&1 | tee "$out/backbones_eager.txt"
timeout 120 python3 benchmarks/bench_train.py --backbones unet --rows bf16 --steps 20 --warmup 3 2>&1 \
    | grep -v -e "Tip:" -e "available:" -e "LOCAL_RANK" | tee "$out/demo_models.txt"
timeout 60 python3 main.py +experiment=shapes_autoencoder trainer=gpu trainer.max_steps=100 paths.root_dir=/tmp/gpu_smoke \
    trainer.val_check_interval=50 2>&1 | tail -8 | tee "$out/smoke_fit.txt"
ls /tmp/gpu_smoke/experiments/shapes_autoencoder/checkpoints 2>&1 | tee -a "$out/smoke_fit.txt"
timeout 240 python3 benchmarks/bench_backbones.py --models dit_xl --compile --warmup 2 --steps 10 2>&1 \
    | tee "$out/backbones_compile.txt"
