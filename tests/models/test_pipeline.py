"""The Python API (ldm.load -> Pipeline) on the tiny trained runs: the task's images, the run's defaults, pairing of
conditions and seeds, encode/decode for diffusion and autoencoder checkpoints, and clear errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from conftest import compose_run
from ldm.data.shapes import ShapesDataset
from ldm.models.pipeline import Pipeline, broadcast
from ldm.tasks import sample
from ldm.utils.images import to_uint8

PROMPT = "a large red circle in the center"


@pytest.fixture(scope="module")
def model(tiny_runs) -> Pipeline:
    return ldm.load(tiny_runs.ldm_ckpt, device="cpu")


def test_load_takes_the_checkpoint_or_its_run_directory(tiny_runs, model):
    from_dir = ldm.load(tiny_runs.ldm_ckpt.parents[1])
    assert from_dir.path == model.path == tiny_runs.ldm_ckpt and from_dir.step == model.step == tiny_runs.ldm_steps
    assert model.device == torch.device("cpu") and model.resolution == 16 and model.is_diffusion
    assert (model.sampling.steps, model.sampling.seeds) == (2, (0, 1))  # the run's own sampling config
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ldm.load(tiny_runs.root / "nowhere")


def test_sample_gives_task_sample_pixels(tiny_runs, model):
    """One code path: the API and task=sample draw identical images for identical settings."""
    out = sample.run(compose_run("shapes_txt2img", [
        *tiny_runs.ldm_overrides, "task=sample", f"task.prompts=[{PROMPT}]", "sampling.seeds=[3,4]",
        "sampling.steps=3", "sampling.sampler=heun", "sampling.guidance_scale=2.5", "task.progress=false",
        "task.tag=api"]))
    images = model.sample(prompts=[PROMPT], seeds=[3, 4], sampler="heun", steps=3, guidance=2.5)
    assert [im.size for im in images] == [(16, 16)] * 2 and all(isinstance(im, Image.Image) for im in images)
    for image, line in zip(images, (out / "samples.jsonl").read_text().splitlines()):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / json.loads(line)["file"]).convert("RGB")))


def test_each_image_depends_on_its_own_seed_and_prompt_only(model):
    both = model.sample(prompts=[PROMPT, "a small blue square in the top left"], seeds=[7, 7], output="tensor")
    alone = model.sample(prompts=["a small blue square in the top left"], seeds=[7], output="tensor")
    assert both.shape == (2, 3, 16, 16) and both.min() >= -1 and both.max() <= 1
    assert (to_uint8(both[1]).int() - to_uint8(alone[0]).int()).abs().max() <= 1  # batching: last-bit rounding only
    assert not torch.equal(both[0], both[1])
    repeated = model.sample(prompts=[PROMPT], seeds=[5, 6], output="tensor")  # one prompt, two seeds
    assert not torch.equal(repeated[0], repeated[1])
    single = model.sample(prompts=[PROMPT], seeds=[5], output="tensor")
    assert (to_uint8(repeated[0]).int() - to_uint8(single[0]).int()).abs().max() <= 1


def test_conditions_and_seeds_pair_up_or_broadcast():
    assert broadcast(["a", "b"], [1, 2]) == (["a", "b"], [1, 2])
    assert broadcast(["a"], [1, 2, 3]) == (["a"] * 3, [1, 2, 3])
    assert broadcast(["a", "b"], [9]) == (["a", "b"], [9, 9])
    with pytest.raises(ValueError, match="2 conditions and 3 seeds"):
        broadcast(["a", "b"], [1, 2, 3])


def test_bad_requests_fail_with_one_line(model):
    with pytest.raises(TypeError, match=r"unknown sampling settings \['guidence'\]"):
        model.sample(prompts=[PROMPT], guidence=3.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.sample(prompts=[PROMPT], sampler="nope")
    with pytest.raises(ValueError, match="nothing to sample"):
        model.sample()
    with pytest.raises(ValueError, match="output must be one of"):
        model.sample(prompts=[PROMPT], output="jpeg")


def test_encode_decode_round_trips_through_the_first_stage(tiny_runs, model):
    scenes = torch.stack([ShapesDataset(size=2, resolution=16, seed=1)[i]["image"] for i in range(2)])
    z = model.encode(scenes)
    assert z.shape == (2, 4, 8, 8)
    first = model.module.first_stage
    with torch.no_grad():  # the normalised posterior mean, as the diffusion model sees latents
        expected = model.module.latent_norm.normalize(first.encode(scenes).mean)
        assert torch.allclose(z, expected)
        assert torch.allclose(model.decode(z), first.decode(first.encode(scenes).mean).clamp(-1, 1), atol=1e-5)
    as_pil = [Image.fromarray(to_uint8(s).permute(1, 2, 0).numpy()) for s in scenes]
    assert torch.allclose(model.encode(as_pil), z, atol=0.05)  # PIL input: uint8 rounding of the same pixels
    assert len(model.decode(z, output="pil")) == 2


def test_an_autoencoder_checkpoint_encodes_and_decodes_but_does_not_sample(tiny_runs):
    ae = ldm.load(tiny_runs.root / "experiments" / "ae")
    assert not ae.is_diffusion and ae.module.lpips is None and ae.module.discriminator is None  # no VGG needed
    scenes = torch.stack([ShapesDataset(size=1, resolution=16, seed=2)[0]["image"]])
    z = ae.encode(scenes)
    assert z.shape == (1, 4, 8, 8)
    assert ae.decode(z).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="autoencoder checkpoint: it encodes and decodes"):
        ae.sample(prompts=[PROMPT])
