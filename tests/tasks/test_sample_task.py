"""task=sample from a tiny trained txt2img checkpoint: PNGs, samples.jsonl, labelled grids, reproducibility,
batch independence, img2img, clear errors and the allow-listed rebuild."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from conftest import compose_run
from ldm.data.shapes import ShapesDataset
from ldm.models.pipeline import image_batch
from ldm.tasks import sample
from ldm.utils.checkpoint import load_module
from ldm.utils.errors import ConfigError
from ldm.utils.images import save_png, to_uint8

PROMPTS = "task.prompts=[a large red circle in the center,a small blue square in the top left]"
FAST = ["sampling.steps=3", "sampling.seeds=[0,1,2]", "task.progress=false", "sampling.guidance_scale=2.0"]


def run_sample(tiny_runs, *overrides: str) -> Path:
    return sample.run(compose_run("shapes_txt2img", [*tiny_runs.ldm_overrides, "task=sample", *overrides]))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]


def assert_grid_holds(out_dir: Path, rows: int, cols: int, scale: int = 3, pad: int = 4) -> None:
    """grid.png = labels + rows x cols tiles, tile (r, c) being image r * cols + c upscaled `scale` times."""
    sheet = pixels(out_dir / "grid.png")
    images = [pixels(out_dir / r["file"]) for r in records(out_dir)]
    assert len(images) == rows * cols
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    height, width = sheet.shape[:2]
    assert width > cols * (w + pad) + pad and height > rows * (h + pad) + pad  # room for row and column labels
    for r in range(rows):
        for c in range(cols):
            # tiles are laid out from the bottom-right corner, `pad` pixels apart
            y, x = height - (rows - r) * (h + pad), width - (cols - c) * (w + pad)
            expected = images[r * cols + c].repeat(scale, axis=0).repeat(scale, axis=1)
            assert np.array_equal(sheet[y : y + h, x : x + w], expected), f"tile ({r}, {c})"


@pytest.fixture(scope="module")
def prompts_x_seeds(tiny_runs) -> Path:
    return run_sample(tiny_runs, PROMPTS, *FAST)


def test_prompts_x_seeds_writes_images_records_and_grid(tiny_runs, prompts_x_seeds):
    out = prompts_x_seeds
    assert out == tiny_runs.root / "experiments" / "ldm" / "samples" / f"step{tiny_runs.ldm_steps:08d}-prompts_x_seeds"
    lines = records(out)
    assert [(r["prompt"][:7], r["seed"]) for r in lines] == [
        ("a large", 0), ("a large", 1), ("a large", 2), ("a small", 0), ("a small", 1), ("a small", 2)]
    for r in lines:
        assert (r["sampler"], r["steps"], r["guidance"], r["ckpt_step"], r["ema"]) == (
            "euler", 3, 2.0, tiny_runs.ldm_steps, True)
        assert pixels(out / r["file"]).shape == (16, 16, 3)
    assert len(list(out.glob("*.png"))) == 7  # six samples and the grid
    assert_grid_holds(out, rows=2, cols=3)
    settings = json.loads((out / "grid.json").read_text())
    assert settings["prompts"][1] == "a small blue square in the top left" and settings["seeds"] == [0, 1, 2]
    assert settings["ckpt_step"] == tiny_runs.ldm_steps and settings["grid"] == "prompts_x_seeds"
    assert not np.array_equal(pixels(out / lines[0]["file"]), pixels(out / lines[1]["file"]))  # another seed


def test_rerun_gives_identical_files(tiny_runs, prompts_x_seeds):
    again = run_sample(tiny_runs, PROMPTS, *FAST, "task.tag=again")
    assert again != prompts_x_seeds
    for r in records(prompts_x_seeds):
        assert (again / r["file"]).read_bytes() == (prompts_x_seeds / r["file"]).read_bytes()


def test_batch_size_does_not_change_images(tiny_runs, prompts_x_seeds):
    one_by_one = run_sample(tiny_runs, PROMPTS, *FAST, "sampling.batch_size=1", "task.tag=bs1")
    fours = run_sample(tiny_runs, PROMPTS, *FAST, "sampling.batch_size=4", "task.tag=bs4")
    for r in records(prompts_x_seeds):
        reference = pixels(prompts_x_seeds / r["file"]).astype(int)  # all six in one batch
        for other in (one_by_one, fours):
            # batched matmuls round differently in the last float bit: at most one uint8 level apart
            assert np.abs(pixels(other / r["file"]).astype(int) - reference).max() <= 1


def test_sampler_x_steps_grid(tiny_runs):
    out = run_sample(tiny_runs, PROMPTS, *FAST, "task.grid=sampler_x_steps", "task.grid_samplers=[euler,heun]",
                     "task.grid_steps=[2,4]")
    lines = records(out)
    assert [(r["sampler"], r["steps"], r["seed"]) for r in lines] == [
        ("euler", 2, 0), ("euler", 4, 0), ("heun", 2, 0), ("heun", 4, 0)]
    assert {r["prompt"] for r in lines} == {"a large red circle in the center"}
    assert_grid_holds(out, rows=2, cols=2)
    assert json.loads((out / "grid.json").read_text())["grid_samplers"] == ["euler", "heun"]


def test_img2img_departs_from_the_init_reconstruction_with_strength(tiny_runs, tmp_path):
    scene = ShapesDataset(size=1, resolution=16, seed=5)[0]
    init = save_png(to_uint8(scene["image"]).permute(1, 2, 0), tmp_path / "init.png")
    model = ldm.load(tiny_runs.ldm_ckpt)  # task=sample encodes init images through the same Pipeline
    reconstruction = np.asarray(model.decode(model.encode([init]), output="pil")[0]).astype(float)

    def distance(strength: float) -> float:
        out = run_sample(tiny_runs, f"task.prompts=[{scene['caption']}]", "sampling.seeds=[0]", "sampling.steps=20",
                         "task.progress=false", "task.grid=none", f"task.init_image={init}",
                         f"task.strength={strength}", f"task.tag=img2img{strength}")
        [record] = records(out)
        assert record["strength"] == strength
        return np.abs(pixels(out / record["file"]) - reconstruction).mean()

    near, mid, far = distance(0.05), distance(0.5), distance(1.0)  # mean uint8 levels
    assert near < mid < far and near < 0.5 * far, (near, mid, far)


def test_init_image_is_centre_cropped_not_stretched(tmp_path):
    """A landscape init image keeps its centred square, resized (what Pipeline.encode feeds the first stage)."""
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)  # H=32, W=48
    Image.fromarray(wide).save(tmp_path / "wide.png")
    exact = image_batch([tmp_path / "wide.png"], 32)[0]
    assert torch.equal(to_uint8(exact).permute(1, 2, 0), torch.from_numpy(wide[:, 8:40]))  # columns 8..39
    smaller = image_batch([str(tmp_path / "wide.png")], 16)[0]
    manual = Image.fromarray(wide[:, 8:40]).resize((16, 16), Image.Resampling.BICUBIC)
    assert torch.equal(to_uint8(smaller).permute(1, 2, 0), torch.from_numpy(np.array(manual)))


def test_missing_prompts_names_the_keys(tiny_runs):
    with pytest.raises(ConfigError, match="prompts=.*prompts_file=.*labels="):
        run_sample(tiny_runs, "task.prompts=null", *FAST)  # shapes_txt2img defaults to its sampling.prompts


@pytest.mark.parametrize("where", ["model", "first_stage"])
def test_rebuild_refuses_targets_outside_the_allow_list(tiny_runs, tmp_path, where):
    ckpt = torch.load(tiny_runs.ldm_ckpt, map_location="cpu", weights_only=True)
    marker = tmp_path / "ran"
    evil = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    if where == "model":
        ckpt["ldm_config"]["model"]["backbone"] = evil
    else:
        ckpt["first_stage_config"]["net"] = evil
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(PermissionError, match="os.system"):
        run_sample(tiny_runs, PROMPTS, *FAST, f"task.ckpt={path}")
    assert not marker.exists()
    shutil.copy(tiny_runs.ldm_ckpt, path)  # the untouched checkpoint rebuilds from the same path
    assert load_module(path)[0].latent_shape == (4, 8, 8)
