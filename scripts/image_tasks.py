"""The image-conditioned shapes tasks against their trivial baselines (issue 19), from a trained run:

    python scripts/image_tasks.py experiments/shapes_sr [--num-samples 256] [--steps 25] [--sampler euler]

Samples the run's EMA model for held-out scenes (ShapesDataset seed 7, fixed masks), scores it and the baseline
(inpainting: PSNR in the hole vs a blurred fill, plus FID of the composite; super-resolution: PSNR / SSIM vs
bicubic; layout: per-pixel class accuracy vs an all-black image, plus FID; LPIPS too with --vgg-weights), prints one JSON object and writes
<run>/eval/image_task.json and <run>/eval/image_task.png (rows: input | output | truth for the first 8 scenes).
"""
import argparse
import json
import time
from pathlib import Path

import torch

import ldm
from ldm.eval.image_tasks import LAYOUT_PALETTE, shapes_task_batch, task_baseline, task_scores
from ldm.eval.shapes_features import shapes_feature_net
from ldm.nn.image_conditions import LowResImage, MaskedImage, SemanticMap
from ldm.nn.lpips import LPIPS
from ldm.utils.atomic import atomic_write_json
from ldm.utils.images import grid, save_png

TASK_OF = {MaskedImage: "inpaint", LowResImage: "sr", SemanticMap: "layout"}


def input_view(task: str, batch: dict) -> torch.Tensor:
    """What the model was given, as images [B, 3, H, W]: the masked image, the upsampled low-res, the map."""
    if task == "inpaint":
        return torch.where(batch["mask"] > 0.5, torch.zeros_like(batch["image"]), batch["image"])
    if task == "sr":
        return torch.nn.functional.interpolate(batch["lowres"], batch["image"].shape[-2:], mode="nearest")
    return (LAYOUT_PALETTE[batch["layout"]].permute(0, 3, 1, 2) * 2 - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory or checkpoint of shapes_inpaint, shapes_sr or shapes_layout")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--features", default="data/eval/shapes_features.pt", help="shapes FID feature net weights")
    parser.add_argument("--vgg-weights", default=None, help="torchvision VGG16 state_dict file: also report LPIPS")
    parser.add_argument("--training-free", default=None, metavar="TXT2IMG_RUN",
                        help="inpainting: also score a text-to-image run inpainting training-free (scene captions)")
    args = parser.parse_args()

    model = ldm.load(args.run, device="cpu")
    image_condition = model.module.conditioner.image
    task = TASK_OF[type(image_condition)]
    batch = shapes_task_batch(task, args.num_samples, resolution=model.resolution)
    sampling = model.settings(steps=args.steps, sampler=args.sampler)
    start = time.perf_counter()
    outputs = []
    for lo in range(0, args.num_samples, sampling.batch_size):
        part = {k: v[lo : lo + sampling.batch_size] for k, v in batch.items()}
        outputs.append(model.module.sample(part, list(range(lo, lo + len(part["image"]))), sampler=sampling.sampler,
                                           steps=sampling.steps, schedule=sampling.schedule).cpu())
    images = torch.cat(outputs)
    seconds = time.perf_counter() - start
    net = shapes_feature_net(args.features) if Path(args.features).is_file() else None
    features = net.features if net is not None else None
    lpips = LPIPS(args.vgg_weights) if args.vgg_weights else None
    result = {
        "run": str(model.path), "step": model.step, "task": task, "num_samples": args.num_samples,
        "sampler": sampling.sampler, "steps": sampling.steps, "sampling_s": round(seconds, 1),
        "model": task_scores(task, batch, images, features, lpips),
        "baseline": task_scores(task, batch, task_baseline(task, batch), features, lpips),
        "truth": task_scores(task, batch, batch["image"], features) if task == "layout" else None,
    }
    if args.training_free and task == "inpaint":  # the same masks, a text-to-image model with the known region imposed
        txt2img = ldm.load(args.training_free, device="cpu")
        filled = torch.cat([txt2img.inpaint(batch["image"][lo : lo + 64], batch["mask"][lo : lo + 64],
                                            batch["caption"][lo : lo + 64],
                                            seeds=list(range(lo, min(lo + 64, args.num_samples))),
                                            training_free=True, output="tensor", steps=sampling.steps)
                            for lo in range(0, args.num_samples, 64)])
        result["training_free"] = {"run": str(txt2img.path), "guidance": txt2img.sampling.guidance_scale,
                                   **task_scores(task, batch, filled, features, lpips)}
    out_dir = model.path.parent.parent / "eval" if model.path.parent.name == "checkpoints" else Path(".")
    atomic_write_json(out_dir / "image_task.json", result)
    rows = torch.stack([input_view(task, batch)[:8], images[:8], batch["image"][:8]], dim=1)  # [8, 3, C, H, W]
    save_png(grid(rows), out_dir / "image_task.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
