"""Every file in configs/experiment/ runs each task it documents, at tiny size on the built-in data.

An experiment that fails to compose, build or run one of its tasks fails here (the digits class-conditional
experiment once inherited the shapes suite's keys and stopped at start-up). Sizes are shrunk by overrides only:
the classes, the suite, the callbacks and every key not named below are the experiment's own.
"""
import json
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import EXPERIMENTS, QUIET, TINY_AE, TINY_LDM, TINY_TEXT, TINY_UNET, compose_run, restored_environ
from ldm.data.shapes import ShapesDataset

# what each experiment documents (its header and the README's table): the tasks this test runs
TASKS = {
    "shapes_autoencoder": ("fit", "cache_latents"),
    "shapes_autoencoder_two": ("fit", "cache_latents"),
    "digits_autoencoder": ("fit", "cache_latents"),
    "autoencoder_kl_f8": ("fit", "cache_latents"),
    "shapes_txt2img": ("fit", "sample", "evaluate"),
    "shapes_txt2img_dit": ("fit", "sample", "evaluate"),
    "shapes_txt2img_two": ("fit", "sample", "evaluate"),  # on shapes_autoencoder_two's two-object cache
    "digits_class2img": ("fit", "sample", "evaluate"),
    "txt2img": ("fit", "sample", "evaluate"),
    "shapes_inpaint": ("fit", "sample"),  # sample: task.images + task.masks; numbers: scripts/image_tasks.py
    "shapes_sr": ("fit", "sample"),
    "shapes_layout": ("fit", "sample"),
    # Stable Diffusion imports: tests/interop/test_interop_pipeline.py runs them on tiny diffusers pipelines
    "sd_vae": ("import", "cache_latents", "export"),
    "sd2_base": ("import", "sample", "cache_latents", "fit", "export"),
    "sd2_v": ("import", "sample"),
    "sd15": ("import", "sample"),
}
INTEROP = ("sd_vae", "sd2_base", "sd2_v", "sd15")
FIT_STEPS = 2
TINY_DIGITS_AE = ["model.net.ch=8", *QUIET, "trainer.limit_val_batches=1"]  # 32 px, f = 4: latents [4, 8, 8]
TINY_F8 = ["model.net.ch=8", "model.net.ch_mult=[1,1,2,2]", "data.resolution=32", "data.batch_size=4",
           "data.num_workers=0", "trainer=cpu", "model.disc_start=1", "model.discriminator.ndf=8", *QUIET]
TINY_DIT = ["model.backbone.hidden_size=32", "model.backbone.depth=1", "model.backbone.num_heads=2", *TINY_TEXT]
SMALL_SAMPLE = ["sampling.steps=2", "sampling.batch_size=4", "task.progress=false"]
SMALL_PERIODIC_EVAL = ["callbacks.periodic_eval.every_n_steps=1", "callbacks.periodic_eval.num_samples=2",
                       "callbacks.periodic_eval.steps=2"]


def test_every_experiment_is_covered():
    assert sorted(TASKS) == EXPERIMENTS, "add the new experiment's documented tasks to TASKS"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def image_folder(root) -> Path:
    """A few shapes scenes as PNG files: the image folder the SD-sized first stage documents."""
    folder = root / "images"
    folder.mkdir()
    for i, item in enumerate(ShapesDataset(size=8, resolution=32, seed=3)):
        pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(item["caption"])
    return folder


@pytest.fixture(scope="module")
def runs(root, image_folder, shapes_feature_weights, tiny_clip, inception_weights_file, tmp_path_factory):
    """run(experiment, task, *overrides) with this module's root dir and each experiment's tiny sizes."""
    from ldm.nn.conditioners import OpenCLIPTextConditioner

    tower = tmp_path_factory.mktemp("open_clip") / "text.pt"  # local weights, as model.conditioner.pretrained takes
    torch.save(OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None).model.state_dict(), tower)
    digits_classifier = tmp_path_factory.mktemp("eval") / "digits_classifier.pt"
    captions = tmp_path_factory.mktemp("eval") / "captions.txt"  # the image folder's captions: txt2img's reference set
    captions.write_text("".join((image_folder / f"{i}.txt").read_text() + "\n" for i in range(8)))
    tiny_shapes_eval = ["eval.resolution=16", f"eval.feature_weights={shapes_feature_weights}",
                        "eval.held_out_samples=2"]
    tiny = {
        "shapes_autoencoder": TINY_AE,
        "shapes_autoencoder_two": TINY_AE,
        "digits_autoencoder": TINY_DIGITS_AE,
        "autoencoder_kl_f8": [*TINY_F8, f"data.root={image_folder}"],
        "shapes_txt2img": [*TINY_UNET, *TINY_TEXT, *tiny_shapes_eval],
        "shapes_txt2img_dit": [*TINY_DIT, *tiny_shapes_eval],
        "shapes_txt2img_two": [*TINY_DIT, *tiny_shapes_eval],
        "digits_class2img": [*TINY_UNET, "model.conditioner.dim=32", "sampling.prompts=null", f"eval.classifier_weights={digits_classifier}"],
        "txt2img": [*TINY_UNET, "model.backbone.head_dim=16", "model.backbone.context_dim=32",
                    f"model.conditioner.model_name={tiny_clip}", f"model.conditioner.pretrained={tower}",
                    "model.latent_shape=[4,4,4]", "trainer=cpu", "data.flip=false",
                    # the reference suite's keys a user fills in, here with local stand-ins; n above pr_k = 3
                    f"eval.prompts_file={captions}", f"eval.reference_dir={image_folder}", "eval.resolution=32",
                    f"eval.inception.weights_path={inception_weights_file}", f"eval.clip.model_name={tiny_clip}",
                    "eval.clip.pretrained=null", f"eval.stats_dir={root / 'reference_stats'}", "eval.kid_subsets=5",
                    "eval.is_splits=2", "eval.num_samples=4", "callbacks.periodic_eval.num_samples=4"],
    }
    # image-conditioned: 16 px on the tiny f = 2 first stage, latents [4, 8, 8] as the experiments say
    tiny_image = [*TINY_UNET, "data.resolution=16", "data.train.size=64", "data.val.size=16"]
    tiny.update({"shapes_inpaint": tiny_image, "shapes_sr": tiny_image,
                 "shapes_layout": [*tiny_image, "model.conditioner.image.downsample_factor=2"]})
    # TINY_LDM drops the periodic evaluation and the progress bar: keep both, as users run them (small)
    ldm_fit = [o for o in TINY_LDM if "periodic_eval" not in o and "enable_progress_bar" not in o]

    def run(name: str, task: str, *overrides: str):
        from ldm.tasks import cache_latents, evaluate, fit, sample

        if task == "fit":
            extra = [f"trainer.max_steps={FIT_STEPS}", f"trainer.val_check_interval={FIT_STEPS}",
                     f"checkpoint_every_n_steps={FIT_STEPS}"]
            if name in LATENT_DIFFUSION or name in IMAGE_TASKS:
                extra += ldm_fit + (SMALL_PERIODIC_EVAL if name in WITH_PERIODIC_EVAL else [])
        elif task == "cache_latents":
            extra = ["task=cache_latents", "task.num_workers=0", "task.progress=false"]
        else:
            extra = [f"task={task}", *SMALL_SAMPLE, *(["eval.num_samples=4"] if task == "evaluate" else [])]
        cfg = compose_run(name, [f"paths.root_dir={root}", *extra, *tiny[name], *overrides])  # its own sizes win
        with restored_environ():
            return {"fit": fit, "cache_latents": cache_latents, "sample": sample, "evaluate": evaluate}[task].run(cfg)

    return run


LATENT_DIFFUSION = ("shapes_txt2img", "shapes_txt2img_dit", "shapes_txt2img_two", "digits_class2img", "txt2img")
IMAGE_TASKS = ("shapes_inpaint", "shapes_sr", "shapes_layout")
WITH_PERIODIC_EVAL = LATENT_DIFFUSION
FIRST_STAGE = {"shapes_txt2img": "shapes_autoencoder", "shapes_txt2img_dit": "shapes_autoencoder",
               "shapes_txt2img_two": "shapes_autoencoder_two",
               "digits_class2img": "digits_autoencoder", "txt2img": "autoencoder_kl_f8"}


@pytest.fixture(scope="module")
def first_stage(runs):
    """Fit and cache an autoencoder experiment once (the latent-diffusion experiments train on its cache)."""

    @cache
    def made(name: str) -> dict:
        trainer = runs(name, "fit")
        return {"trainer": trainer, "cache": runs(name, "cache_latents")}

    return made


def _check_fit(trainer, run_dir: Path) -> None:
    assert trainer.global_step == FIT_STEPS
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in LATENT_DIFFUSION + IMAGE_TASKS + INTEROP])
def test_autoencoder_experiment_fits_and_caches(name, root, first_stage):
    made = first_stage(name)
    _check_fit(made["trainer"], root / "experiments" / name)
    for split, result in made["cache"].items():
        manifest = json.loads(result.manifest.read_text())
        dataset = getattr(made["trainer"].datamodule, split)
        assert manifest["num_samples"] == len(dataset) and manifest["skipped"]["total"] == 0
        assert len(manifest["latent_shape"]) == 3
    assert set(made["cache"]) == {s for s in ("train", "val") if getattr(made["trainer"].datamodule, s) is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", LATENT_DIFFUSION)
def test_latent_diffusion_experiment_fits_samples_and_evaluates(name, root, runs, first_stage):
    first_stage(FIRST_STAGE[name])
    run_dir = root / "experiments" / name
    _check_fit(runs(name, "fit"), run_dir)
    if name in WITH_PERIODIC_EVAL:  # eval during training ran the experiment's own suite
        during = (run_dir / "eval" / "during_training.csv").read_text().splitlines()
        assert len(during) == 1 + FIT_STEPS and ("clip_score" if name == "txt2img" else "acc_") in during[0]

    out_dir = runs(name, "sample")
    records = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert records and all((out_dir / r["file"]).is_file() for r in records)
    assert (out_dir / "grid.png").is_file()
    if name == "digits_class2img":  # labels by default: one of each digit per seed
        assert sorted({r["label"] for r in records}) == list(range(10))

    if "evaluate" in TASKS[name]:
        rows = runs(name, "evaluate")
        [row] = rows
        accuracies = {k: v for k, v in row.items() if k.startswith("acc_")}
        shapes = {f"{split}acc_{a}" for split in ("", "seen_", "held_out_") for a in ("color", "position", "binding")}
        expected = {"digits_class2img": {"acc_class"}, "txt2img": {"fid", "kid", "precision", "recall", "clip_score"}
                    }.get(name, shapes)
        assert expected <= set(row) and all(0.0 <= v <= 1.0 for v in accuracies.values())
        assert row["step"] == FIT_STEPS and (run_dir / "eval" / "metrics.json").is_file()


def test_digits_class2img_uses_the_digits_suite_alone():
    """The suite is a config group: the shapes suite's keys cannot leak into the digits experiment."""
    cfg = compose_run("digits_class2img")
    assert cfg.eval._target_ == "ldm.eval.suites.DigitsSuite" and "num_objects" not in cfg.eval
    assert cfg.callbacks.periodic_eval.suite._target_ == "ldm.eval.suites.DigitsSuite"
    assert compose_run("shapes_txt2img").eval._target_ == "ldm.eval.suites.ShapesSuite"


def test_txt2img_composes_without_its_reference_set_and_evaluating_names_the_missing_key(tmp_path,
                                                                                        inception_weights_file):
    """The reference suite's files are the user's to fill in: only a run that evaluates reads them."""
    from omegaconf.errors import MissingMandatoryValue

    from ldm.tasks import evaluate
    from ldm.utils import cli

    cfg = compose_run("txt2img", [f"paths.root_dir={tmp_path}", "task=evaluate"])
    assert cfg.eval._target_ == "ldm.eval.reference_suite.ReferenceSuite"
    assert cfg.callbacks.periodic_eval.num_samples < cfg.eval.num_samples  # the small n while training
    with pytest.raises(MissingMandatoryValue, match="eval.reference_dir"):
        evaluate.run(cfg)
    cfg = compose_run("txt2img", [
        f"paths.root_dir={tmp_path}", "task=evaluate", "eval.prompts_file=/no/prompts.txt",
        "eval.reference_dir=/no/images", f"eval.inception.weights_path={inception_weights_file}", "eval.clip=null"])
    with pytest.raises(Exception) as raised:  # Hydra wraps it; main.py prints the clear cause as one line
        evaluate.run(cfg)
    line = cli.task_error_line(raised.value, cli.clear_cause(raised.value, (FileNotFoundError,)))
    assert line.startswith("prompts file not found: '/no/prompts.txt'. Set the config key `eval.prompts_file`")
    assert "\n" not in line


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_image_task_experiment_fits_and_samples_from_conditioning_images(name, root, runs, first_stage):
    """Fit on images encoded on the fly (inputs made per batch), then task=sample from a folder of conditioning
    images (and masks): one output per image and seed, and a grid with the inputs beside the outputs."""
    first_stage("shapes_autoencoder")
    _check_fit(runs(name, "fit"), root / "experiments" / name)
    # the training grid: each validation image, then one sample per seed from its condition
    assert (root / "experiments" / name / "samples" / f"samples-step{FIT_STEPS:08d}.png").is_file()
    folder = root / f"{name}_inputs"
    folder.mkdir(exist_ok=True)
    side = 4 if name == "shapes_sr" else 16  # super-resolution's inputs are the low-res pictures
    for i, item in enumerate(ShapesDataset(size=3, resolution=side, seed=9)):
        pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    overrides = [f"task.images={folder}", "sampling.seeds=[0,1]"]
    if name == "shapes_inpaint":
        masks = root / "masks"
        masks.mkdir(exist_ok=True)
        for i in range(3):
            pixels = torch.zeros(16, 16, dtype=torch.uint8)
            pixels[4:12, 2 + i : 10 + i] = 255
            Image.fromarray(pixels.numpy()).save(masks / f"{i}.png")
        overrides.append(f"task.masks={masks}")
    out_dir = runs(name, "sample", *overrides)
    records = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 and all((out_dir / r["file"]).is_file() for r in records)  # 3 images x 2 seeds
    assert Image.open(out_dir / records[0]["file"]).size == (16, 16)
    grid = Image.open(out_dir / "grid.png")
    assert grid.width > grid.height  # input + 2 seeds per row, 3 rows
    if name == "shapes_inpaint":  # the same masks with the known region imposed at every step (training-free path)
        free = runs(name, "sample", *overrides, "task.training_free=true", "task.tag=free")
        records = [json.loads(line) for line in (free / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 6 and all(r["training_free"] for r in records) and (free / "grid.png").is_file()
