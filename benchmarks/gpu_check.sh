#!/usr/bin/env bash
# The GPU check, one command (at most 9 minutes of timeouts; fits one 10-minute device call): the full-size backbones
# (SD2 UNet, diffusers' UNet at the same config, DiT-XL/2) in bf16 with SDPA's default kernels (the math rows were
# measured on 2026-12-04), the demo UNet through Lightning (cached vs on-the-fly latents, bf16, compile, SDPA math),
# a short shapes autoencoder fit on the GPU, its latent cache and a short demo (shapes_txt2img) fit through main.py
# that logs images/s, data wait and MFU to metrics.csv (ldm/callbacks/throughput.py), the latent cache reader's supply
# through DataLoader workers against an SD2 step's demand, and last, since compiling the full-size models took over
# 150-230 s on the H200 of 2026-12-04, torch.compile rows (regional: each block compiled once).
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
timeout 60 python3 benchmarks/bench_backbones.py --sdpa default 2>&1 | tee "$out/backbones_eager.txt"
# to a file, not a pipe: a killed run's DataLoader workers kept a pipe open and stalled the script (2026-12-04)
timeout -k 5 65 python3 benchmarks/bench_train.py --backbones unet --rows bf16 --steps 10 --warmup 2 \
    > "$out/demo_models_full.txt" 2>&1
grep -v -e "Tip:" -e "available:" -e "LOCAL_RANK" "$out/demo_models_full.txt" | tail -20 | tee "$out/demo_models.txt"
smoke=(paths.root_dir=/tmp/gpu_smoke trainer.enable_model_summary=false)
timeout 50 python3 main.py +experiment=shapes_autoencoder trainer=gpu trainer.max_steps=100 "${smoke[@]}" \
    trainer.val_check_interval=50 2>&1 | tail -8 | tee "$out/smoke_fit.txt"
ls /tmp/gpu_smoke/experiments/shapes_autoencoder/checkpoints 2>&1 | tee -a "$out/smoke_fit.txt"
# the demo model through main.py on the GPU: the throughput metrics (images/s, data wait, MFU) in its metrics.csv
timeout 35 python3 main.py +experiment=shapes_autoencoder task=cache_latents "${smoke[@]}" data.train.size=4096 \
    task.progress=false 2>&1 | grep -e "written" -e "Error" | tee "$out/demo_fit.txt"
timeout 60 python3 main.py +experiment=shapes_txt2img trainer=gpu trainer.max_steps=200 trainer.log_every_n_steps=50 \
    trainer.val_check_interval=200 checkpoint_every_n_steps=200 callbacks=none '~callbacks.periodic_eval' data.num_workers=4 "${smoke[@]}" 2>&1 \
    | grep -e "^\[fit\]" -e "^step " -e "Error" | tee -a "$out/demo_fit.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/demo_fit.txt"
import csv
with open("/tmp/gpu_smoke/experiments/shapes_txt2img/metrics.csv") as f:
    rows = [r for r in csv.DictReader(f) if r.get("train/images_per_s")]
names = ["step", "train/loss", "train/images_per_s", "train/data_wait", "train/mfu"]
print("  ".join(f"{n:>18}" for n in names))
for r in rows[-4:]:
    print("  ".join(f"{r.get(n) or '-':>18.18}" for n in names))
PY
# the latent cache reader's supply through DataLoader workers (16 cores here) against the SD2 UNet step's demand
timeout 45 python3 benchmarks/bench_latent_index.py --loader-workers 0 1 2 4 8 16 --workers 16 --seconds 2 2>&1 \
    | tee "$out/loader_workers.txt"
# regional compilation (each block compiled once, reused): the whole-model compile of DiT-XL/2 did not finish in 230 s
timeout 190 python3 benchmarks/bench_backbones.py --models unet_sd dit_xl --compile --regional --warmup 3 --steps 10 \
    2>&1 | tee "$out/backbones_compile.txt"
