"""The txt2img path rehearsed on a CPU, shaped like a real run: img2dataset shards (with bad members) -> latent cache
by 2 processes -> 2-rank DDP fit (gloo), killed with SIGKILL and resumed -> task=sample -> task=evaluate
(eval=reference).

    python scripts/rehearsal/run.py [--size ci|full] [--out DIR]      (make rehearsal: --size full)

Every step is `python main.py ...` as a user types it; the models are the txt2img architectures scaled down with
random weights from local files (inputs.py, weights.py). Each step's outcome is checked; a failed check raises.
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inputs  # noqa: E402
import weights  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.utils.checkpoint import read_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900  # any one step: nothing may hang


@dataclass(frozen=True)
class Size:
    resolution: int        # pixels; latents [4, resolution / 8, resolution / 8]
    shards: int
    per_shard: int         # samples per input shard (shard 0 includes the len(inputs.CORRUPT) bad ones)
    ae_channels: int       # kl_f8 has 128
    unet_channels: int     # unet_sd has 320
    channel_mult: tuple    # unet_sd: (1, 2, 4, 4)
    attention: tuple       # unet_sd: (4, 2, 1)
    tower_width: int       # ViT-H-14's text tower: 1024 wide, 24 layers
    tower_layers: int
    batch_size: int        # per rank
    steps: int
    checkpoint_every: int  # steps; the kill lands after the first such checkpoint


SIZES = {
    "ci": Size(32, 2, 10, 8, 32, (1, 2), (2,), 64, 3, 2, 12, 2),
    "full": Size(128, 4, 32, 32, 64, (1, 2, 4, 4), (4, 2, 1), 256, 6, 4, 60, 20),
}


def main_py(*overrides: str) -> list[str]:
    return [sys.executable, "main.py", *overrides]


def run(*overrides: str) -> str:
    """One step to completion; its output, or a failure with the output's tail."""
    done = subprocess.run(main_py(*overrides), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"main.py {' '.join(overrides)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return done.stdout


def prepare(out: Path, size: Size) -> dict:
    """Shards and local weight files; the first stage where `+experiment=txt2img` looks for it by default."""
    urls = inputs.write_shards(out / "shards", size.shards, size.per_shard, size.resolution)
    data = ["data=webdataset", f"data.urls='{urls}'", f"data.resolution={size.resolution}",
            f"data.min_size={size.resolution // 2}", f"paths.root_dir={out}"]
    first_stage = out / "experiments" / "autoencoder_kl_f8" / "checkpoints" / "last.ckpt"
    first_stage.parent.mkdir(parents=True, exist_ok=True)
    weights.first_stage_checkpoint(first_stage, [f"model.net.ch={size.ae_channels}", *data])
    tower, tower_weights = weights.openclip_tower(out / "weights" / "open_clip_vit_h_small", size.tower_width,
                                                  size.tower_layers)
    r = size.resolution // 8
    txt2img = [
        "+experiment=txt2img", f"paths.root_dir={out}", f"model.conditioner.model_name={tower}",
        f"model.conditioner.pretrained={tower_weights}", f"model.latent_shape=[4,{r},{r}]",
        f"model.backbone.model_channels={size.unet_channels}",
        f"model.backbone.channel_mult=[{','.join(map(str, size.channel_mult))}]", "model.backbone.num_res_blocks=1",
        f"model.backbone.attention_resolutions=[{','.join(map(str, size.attention))}]",
        f"model.backbone.context_dim={size.tower_width}", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", f"data.batch_size={size.batch_size}", "data.num_workers=0",
        "model.optimizer.warmup_steps=0", "sampling.steps=2", "sampling.seeds=[0,1]",
    ]
    return {"data": data, "txt2img": txt2img}


def cache(out: Path, data: list[str], size: Size) -> dict:
    """Two independent processes on the same cache: they split the shards through claims."""
    command = main_py("+experiment=autoencoder_kl_f8", "task=cache_latents", *data, "task.num_workers=1",
                      "task.progress=false", "task.batch_size=8")
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("caching failed:\n" + "\n".join(log[-3000:] for log in logs))
    cache_dir = out / "data" / "latents" / "autoencoder_kl_f8" / "train"
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    expected = {reason: 1 for reason in inputs.CORRUPT.values()}
    assert manifest["skipped"]["reasons"] == expected, manifest["skipped"]
    assert manifest["num_samples"] == size.shards * size.per_shard - len(expected), manifest["num_samples"]
    r = size.resolution // 8
    assert manifest["latent_shape"] == [4, r, r], manifest["latent_shape"]
    assert len(list(cache_dir.glob("*.tar"))) == size.shards  # input shard i -> latent shard i
    return {"logs": logs, "manifest": manifest}


def fit_killed_and_resumed(out: Path, txt2img: list[str], size: Size) -> dict:
    """Fit on 2 ranks, SIGKILL every process once the first periodic checkpoint exists, fit again to the end."""
    # the experiment evaluates with the reference suite while training, which needs real images: not here
    fit = [*txt2img, "~callbacks.periodic_eval", f"trainer.max_steps={size.steps}",
           f"checkpoint_every_n_steps={size.checkpoint_every}", f"trainer.val_check_interval={size.checkpoint_every}"]
    run_dir = out / "experiments" / "txt2img"
    first, last = (run_dir / "checkpoints" / name for name in (f"step-{size.checkpoint_every:08d}.ckpt", "last.ckpt"))
    log = out / "fit_killed.log"
    with log.open("w") as sink:  # its own session: the kill reaches rank 1, which Lightning started
        job = subprocess.Popen(main_py(*fit), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        while not (first.exists() and last.exists()):
            if job.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.pid, signal.SIGKILL)
                raise RuntimeError(f"no {first.name} (exit {job.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    killed_at = read_checkpoint(last)["global_step"]
    run_id = (run_dir / "run_id").read_text()
    resumed = run(*fit)
    assert f"at step {killed_at}" in resumed and "Resuming from" in resumed, resumed[-2000:]
    assert 0 < killed_at < size.steps, killed_at
    assert read_checkpoint(last)["global_step"] == size.steps
    assert (run_dir / "run_id").read_text() == run_id  # the same run, not a new one
    return {"killed_at": killed_at, "resumed_log": resumed, "run_id": run_id}


def sample(out: Path, txt2img: list[str], size: Size) -> Path:
    run(*txt2img, "task=sample", "task.progress=false", "sampling.batch_size=2")
    jsonl = max((out / "experiments" / "txt2img").glob("samples/**/samples.jsonl"), key=lambda p: p.stat().st_mtime)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 2 * 2, records  # the experiment's 2 prompts x seeds [0, 1]
    for record in records:
        with Image.open(jsonl.parent / record["file"]) as img:
            assert img.size == (size.resolution, size.resolution), img.size
    assert (jsonl.parent / "grid.png").is_file()
    return jsonl.parent


def evaluate(out: Path, txt2img: list[str], size: Size) -> dict:
    """The experiment's own suite (eval=reference) as a user runs it: captions of held-out scenes against those
    scenes, FID/KID/IS/precision-recall with a local Inception file (random weights), no CLIP score."""
    reference = inputs.reference_set(out / "reference", 8, size.resolution)
    inception = out / "weights" / "inception_random.pth"
    weights.inception_file(inception)
    run(*txt2img, "task=evaluate", f"eval.prompts_file={reference / 'prompts.txt'}",
        f"eval.reference_dir={reference / 'images'}", f"eval.inception.weights_path={inception}", "eval.clip=null",
        "eval.num_samples=4", f"eval.resolution={size.resolution}", "eval.is_splits=2", "eval.kid_subset_size=4",
        f"eval.stats_dir={out / 'reference_stats'}", "task.progress=false")
    rows = json.loads((out / "experiments" / "txt2img" / "eval" / "metrics.json").read_text())
    assert rows[-1]["n"] == 4 and rows[-1]["step"] == size.steps, rows[-1]
    return rows[-1]


def rehearse(out: Path, size: Size) -> dict:
    """All steps in order; what each produced (the checks have passed when this returns)."""
    setup = prepare(out, size)
    report = {"cache": cache(out, setup["data"], size)}
    report["fit"] = fit_killed_and_resumed(out, setup["txt2img"], size)
    report["samples"] = sample(out, setup["txt2img"], size)
    report["metrics"] = evaluate(out, setup["txt2img"], size)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        report = rehearse(out, SIZES[args.size])
        manifest = report["cache"]["manifest"]
        print(f"cache: {manifest['num_samples']} latents {manifest['latent_shape']}, "
              f"skipped {manifest['skipped']['reasons']}")
        fit = report["fit"]
        print(f"fit: killed at step {fit['killed_at']}, resumed to {SIZES[args.size].steps} (run {fit['run_id']})")
        print(f"samples: {report['samples']}")
        print(f"metrics: {json.dumps(report['metrics'])}")
    print(f"rehearsal ({args.size}) passed in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
