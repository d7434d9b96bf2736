"""Whole Stable Diffusion pipelines through task=import / task=export: a tiny random diffusers pipeline (built here,
nothing downloaded) imported, sampled by us and by diffusers from the same noise, exported back to a diffusers folder
and to an original-layout single file that diffusers loads, and the single file imported again."""
import pytest
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import compose_run
from ldm.diffusion.noise import SampleNoise
from ldm.interop.clip_text import write_clip_tokenizer
from ldm.tasks import export, import_weights
from ldm.utils.checkpoint import load_module
from ldm.utils.errors import ConfigError

PROMPTS = ["a red circle", "two blue squares on grass"]  # no "!" and nothing ftfy would change (tokenizers agree)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


FLAVOURS = {  # experiment -> the tiny pipeline's SD version traits
    "sd2_base": dict(prediction="epsilon", act="gelu", pad="!", heads=(2, 4), linear=True),
    "sd2_v": dict(prediction="v_prediction", act="gelu", pad="!", heads=(2, 4), linear=True),
    "sd15": dict(prediction="epsilon", act="quick_gelu", pad="<|endoftext|>", heads=2, linear=False),
}


def tiny_pipeline(folder, prediction: str = "epsilon", act: str = "gelu", pad: str = "!", heads=(2, 4),
                  linear: bool = True) -> StableDiffusionPipeline:
    """SD-shaped at tiny size: f=2 KL autoencoder; UNet with 16 channels per head (SD 2.x, linear projections) or a
    fixed head count (SD 1.x, 1x1-conv projections); CLIP text model (gelu padded with "!", SD 2.x; quick_gelu padded
    with end-of-text, SD 1.x); DDIM with SD's betas and steps_offset 1 (set_alpha_to_one: the last step reaches x0)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=heads, use_linear_projection=linear)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=2, hidden_act=act,
                                        pad_token_id=49407 if pad != "!" else 0))
    for module in (vae, unet, text):  # random weights of a useful scale (zero-initialised layers would hide bugs)
        for p in module.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    write_clip_tokenizer(folder / "tokenizer_src", pad_token=pad)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=True, prediction_type=prediction)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(
        folder / "tokenizer_src"), unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return pipe


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder and imported into experiments/sd2_base."""
    root = tmp_path_factory.mktemp("interop")
    pipe = tiny_pipeline(root)
    cfg = compose_run("sd2_base", ["task=import", f"task.src={root / 'sd'}", f"paths.root_dir={root}"])
    ckpt = import_weights.run(cfg)
    return root, pipe, ckpt


def diffusers_latents(pipe, noise: torch.Tensor, sigma_max: float, steps: int, guidance: float) -> torch.Tensor:
    """diffusers' sampling loop from our starting point x_T = n sigma_max: the pipeline multiplies the latents it is
    given by init_noise_sigma (DDIM: 1, in VP space x / sqrt(1 + sigma^2); Euler with leading spacing:
    sqrt(1 + sigma_max^2), in x's space), so both start from n sigma_max / sqrt(1 + sigma_max^2)."""
    start = noise * sigma_max / (1 + sigma_max**2) ** 0.5
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=start,
                output_type="latent").images


@pytest.mark.parametrize("experiment", FLAVOURS)
def test_an_imported_pipeline_samples_what_diffusers_samples_from_the_same_noise(experiment, imported, tmp_path):
    if experiment == "sd2_base":
        root, pipe, ckpt = imported
    else:
        pipe = tiny_pipeline(tmp_path, **FLAVOURS[experiment])
        ckpt = import_weights.run(compose_run(experiment, ["task=import", f"task.src={tmp_path / 'sd'}",
                                                           f"paths.root_dir={tmp_path}"]))
    module, config, _ = load_module(ckpt)
    assert config.model.formulation.prediction == {"epsilon": "eps", "v_prediction": "v"}[pipe.scheduler.config.prediction_type]
    seeds, steps = [3, 7], 6
    noise = SampleNoise(seeds).randn(module.latent_shape)
    sigma_max = float(module.formulation.step_sigmas(steps, "leading")[0])
    theirs = diffusers_latents(pipe, noise, sigma_max, steps, guidance=7.5)
    ours = module.sample(module.sample_batch(PROMPTS, None), seeds, decode=False, sampler="ddim", steps=steps,
                         schedule="leading", guidance_scale=7.5)
    assert config.model.formulation.steps_offset == 1 and module.latent_shape == (4, 8, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, theirs.abs().max().item()), rtol=0)
    if experiment == "sd2_base":  # and Euler, through the same pipeline with diffusers' Euler scheduler
        euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
        theirs_euler = diffusers_latents(StableDiffusionPipeline(**{**pipe.components, "scheduler": euler}), noise,
                                         sigma_max, steps, guidance=7.5)
        ours_euler = module.sample(module.sample_batch(PROMPTS, None), seeds, decode=False, sampler="euler",
                                   steps=steps, schedule="leading", guidance_scale=7.5)
        torch.testing.assert_close(ours_euler, theirs_euler, atol=1e-4 * max(1.0, theirs_euler.abs().max().item()),
                                   rtol=0)
    images = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(module.first_stage.decode(module.latent_norm.unnormalize(ours)).clamp(-1, 1), images,
                               atol=1e-4, rtol=0)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_import_then_export_gives_back_a_diffusers_folder_with_identical_tensors(imported, tmp_path):
    root, pipe, _ = imported
    cfg = compose_run("sd2_base", ["task=export", "task.format=diffusers", f"paths.root_dir={root}",
                                   f"task.out_dir={tmp_path}"])
    [folder] = export.run(cfg)
    back = StableDiffusionPipeline.from_pretrained(folder)
    for part in ("vae", "unet", "text_encoder"):
        _same_weights(getattr(back, part), getattr(pipe, part))
    assert back.vae.config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    assert back.tokenizer(PROMPTS).input_ids == pipe.tokenizer(PROMPTS).input_ids
    assert type(back.scheduler).__name__ in ("DDIMScheduler", "EulerDiscreteScheduler")
    with pytest.raises(ConfigError, match="exists"):  # never overwritten
        export.run(cfg)


def test_the_single_file_export_loads_in_diffusers_and_imports_back(imported, tmp_path):
    root, pipe, ckpt = imported
    cfg = compose_run("sd2_base", ["task=export", "task.format=single_file", f"paths.root_dir={root}",
                                   f"task.out_dir={tmp_path}"])
    [single] = export.run(cfg)
    loaded = StableDiffusionPipeline.from_single_file(single, config=str(root / "sd"), local_files_only=True)
    for part in ("vae", "unet", "text_encoder"):
        _same_weights(getattr(loaded, part), getattr(pipe, part))
    # and back in: the experiment supplies what a single file does not record (heads, text tower, prediction)
    module, config, _ = load_module(ckpt)
    arch = [f"model.backbone.head_dim={config.model.backbone.head_dim}", "model.backbone.num_heads=null",
            *(f"model.conditioner.text_cfg.{k}={v}" for k, v in config.model.conditioner.text_cfg.items())]
    again = compose_run("sd2_base", ["task=import", f"task.src={single}", f"paths.root_dir={tmp_path}", *arch])
    reimported, _, _ = load_module(import_weights.run(again))
    _same_weights(reimported.denoiser.net, module.denoiser.net)
    _same_weights(reimported.conditioner, module.conditioner)
    _same_weights(reimported.first_stage.net, module.first_stage.net)


def overrides(prefix: str, cfg) -> list[str]:
    """Hydra overrides that set every leaf of `cfg` under `prefix` (lists, nulls and nested dicts included)."""
    out = []
    for k, v in cfg.items():
        if k == "_target_":
            continue
        if isinstance(v, dict) or hasattr(v, "items"):
            out += overrides(f"{prefix}.{k}", v)
        else:
            value = "null" if v is None else "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) or \
                type(v).__name__ == "ListConfig" else v
            out.append(f"{prefix}.{k}={value}")
    return out


COMMON = ["trainer=cpu", "trainer.precision=32-true"]
TRAIN = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.batch_size=4",
         "data.num_workers=0", "sampling.steps=2", "sampling.seeds=[0]", "checkpoint_every_n_steps=3"]


@pytest.fixture(scope="module")
def cached(imported):
    """The imported pipeline's latent cache of 32 shapes scenes (16 px), made with its own autoencoder."""
    from ldm.tasks import cache_latents

    root, pipe, ckpt = imported
    cache_latents.run(compose_run("sd2_base", [f"paths.root_dir={root}", *COMMON, "task=cache_latents", "data=shapes",
                                               "data.resolution=16", "data.train.size=32", "data.val.size=8",
                                               "task.num_workers=0", "task.progress=false"]))
    _, stored, _ = load_module(ckpt)
    return root, pipe, ckpt, stored


@pytest.mark.slow
def test_import_cache_finetune_sample_export_and_load_in_diffusers(cached, tmp_path):
    """The whole interop path as a user runs it: the imported pipeline caches latents with its own autoencoder, a new
    run fine-tunes from it (init_from: step 0, fresh optimizer, the source's latent scale 0.18215 kept even where the
    data would normalise otherwise), samples, and its export loads in diffusers with the fine-tuned weights."""
    from conftest import QUIET, run_main
    from ldm.interop.keymap import to_theirs
    from ldm.interop.unet import unet_keymap

    root, pipe, ckpt, stored = cached
    common = [f"paths.root_dir={root}", *COMMON]
    arch = [*overrides("model.backbone", stored.model.backbone), *overrides("model.conditioner", stored.model.conditioner),
            "model.latent_shape=[4,8,8]"]
    fit = run_main("+experiment=sd2_base", "name=sd2_ft", "first_stage_name=sd2_base", f"init_from={ckpt}", *common,
                   *arch, *TRAIN, "data.scale=global_std", *QUIET)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "init_from" in fit.stdout and "step 0, fresh optimizer" in fit.stdout and "latent norm" in fit.stdout
    tuned, tuned_cfg, tuned_ckpt = load_module(root / "experiments" / "sd2_ft" / "checkpoints" / "last.ckpt")
    assert tuned_ckpt["global_step"] == 3
    assert torch.allclose(tuned.latent_norm.scale, torch.full_like(tuned.latent_norm.scale, 0.18215))  # the source's
    assert torch.all(tuned.latent_norm.shift == 0)
    sample = run_main("+experiment=sd2_base", "name=sd2_ft", "first_stage_name=sd2_base", *common, *arch,
                      "task=sample", "task.prompts=[a red circle]", "sampling.steps=2", "sampling.seeds=[0]")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert list((root / "experiments" / "sd2_ft" / "samples").rglob("*.png"))
    [folder] = export.run(compose_run("sd2_base", [*common, *arch, "name=sd2_ft", "first_stage_name=sd2_base",
                                                   "task=export", "task.format=diffusers", f"task.out_dir={tmp_path}"]))
    back = StableDiffusionPipeline.from_pretrained(folder)
    ema_unet = tuned.ema.net["backbone"].state_dict()
    expected = to_theirs(ema_unet, unet_keymap(tuned_cfg.model.backbone, "diffusers"), what="unet")
    assert all(torch.equal(back.unet.state_dict()[k], v) for k, v in expected.items())
    assert any(not torch.equal(back.unet.state_dict()[k], pipe.unet.state_dict()[k]) for k in expected)  # it trained


@pytest.mark.slow
def test_a_lora_finetune_exports_an_adapter_file_diffusers_loads_and_a_merged_model(cached, tmp_path):
    """LoRA on the imported UNet's attention projections (peft): the adapter-only file loads into the original
    diffusers pipeline with load_lora_weights, and the merged export, and both give our LoRA model's UNet output."""
    from conftest import QUIET, run_main

    root, pipe, ckpt, stored = cached
    common = [f"paths.root_dir={root}", *COMMON]
    arch = [*overrides("model.backbone.net", stored.model.backbone), *overrides("model.conditioner",
                                                                                 stored.model.conditioner),
            "model.latent_shape=[4,8,8]"]
    lora = ["+experiment=sd2_base", "name=sd2_lora", "first_stage_name=sd2_base", "model/backbone=lora_unet_sd",
            "model.backbone.rank=4", *common, *arch]
    fit = run_main(*lora, f"init_from={ckpt}", *TRAIN, "model.optimizer.lr=1e-2", *QUIET)
    assert fit.returncode == 0, fit.stderr[-3000:]
    tuned, _, _ = load_module(root / "experiments" / "sd2_lora" / "checkpoints" / "last.ckpt")
    [adapters] = export.run(compose_run("sd2_base", [*lora[1:], "task=export", "task.format=lora",
                                                     f"task.out_dir={tmp_path}"]))
    [merged] = export.run(compose_run("sd2_base", [*lora[1:], "task=export", "task.format=diffusers",
                                                   f"task.out_dir={tmp_path}"]))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        ours = tuned.ema.net["backbone"](x, t, context=context)
        base = pipe.unet(x, t, encoder_hidden_states=context).sample
        assert (ours - base).abs().max() > 1e-3  # the adapters learned something
        merged_unet = StableDiffusionPipeline.from_pretrained(merged).unet
        torch.testing.assert_close(merged_unet(x, t, encoder_hidden_states=context).sample, ours, atol=1e-5, rtol=0)
        with_lora = StableDiffusionPipeline.from_pretrained(root / "sd")
        with_lora.load_lora_weights(str(adapters))
        torch.testing.assert_close(with_lora.unet(x, t, encoder_hidden_states=context).sample, ours, atol=1e-5,
                                   rtol=0)


def test_fit_refuses_to_resume_an_import_and_points_to_init_from(imported):
    from ldm.tasks import fit

    root, _, _ = imported
    with pytest.raises(ConfigError, match="init_from=.*sd2_base/checkpoints/last.ckpt"):
        fit.run(compose_run("sd2_base", [f"paths.root_dir={root}", "trainer=cpu"]))


def test_import_refuses_a_run_directory_with_checkpoints(imported):
    root, _, _ = imported
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        import_weights.run(compose_run("sd2_base", ["task=import", f"task.src={root / 'sd'}", f"paths.root_dir={root}"]))


def test_an_sdxl_single_file_and_a_wrong_experiment_are_clear_errors(imported, tmp_path):
    from safetensors.torch import save_file

    root, _, _ = imported
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, sdxl)
    with pytest.raises(ConfigError, match="SDXL .*not supported"):
        import_weights.run(compose_run("sd2_base", ["task=import", f"task.src={sdxl}", f"paths.root_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="autoencoder experiment"):  # a whole pipeline into an autoencoder run
        import_weights.run(compose_run("sd_vae", ["task=import", f"task.src={root / 'sd'}",
                                                  f"paths.root_dir={tmp_path}"]))


def test_an_imported_autoencoder_encodes_like_diffusers_and_its_cache_takes_its_scaling_factor(imported, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldm.data.latents import LatentDataModule
    from ldm.models.first_stage import load_first_stage
    from ldm.tasks import cache_latents

    root, pipe, _ = imported
    common = [f"paths.root_dir={tmp_path}", "data=shapes", "data.resolution=16", "data.train.size=16",
              "data.val.size=8"]
    ckpt = import_weights.run(compose_run("sd_vae", ["task=import", f"task.src={root / 'sd' / 'vae'}", *common]))
    first_stage = load_first_stage(ckpt)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    theirs = pipe.vae.encode(x).latent_dist
    ours = first_stage.encode(x)
    torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(first_stage.decode(ours.mean), pipe.vae.decode(theirs.mean).sample, atol=1e-5, rtol=0)
    cache_latents.run(compose_run("sd_vae", [*common, "task=cache_latents", "task.num_workers=0",
                                             "task.progress=false"]))
    data = LatentDataModule(str(tmp_path / "data" / "latents" / "sd_vae" / "train"), batch_size=4)  # scale=auto
    assert torch.equal(data.norm.scale, torch.full_like(data.norm.scale, 0.18215)) and torch.all(data.norm.shift == 0)
    [folder] = export.run(compose_run("sd_vae", [*common, "task=export", "task.format=diffusers",
                                                 f"task.out_dir={tmp_path / 'export'}"]))
    _same_weights(DiffusersVAE.from_pretrained(folder), pipe.vae)


def test_a_folder_with_missing_and_unknown_tensors_is_refused_with_their_names(imported, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _, _ = imported
    folder = shutil.copytree(root / "sd", tmp_path / "sd")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ConfigError, match=r"the unet: .*missing in the source \(1\): conv_out.bias.*unknown in the "
                                          r"source \(1\): extra.weight"):
        import_weights.run(compose_run("sd2_base", ["task=import", f"task.src={folder}",
                                                    f"paths.root_dir={tmp_path}"]))
    assert not (tmp_path / "experiments" / "sd2_base" / "checkpoints" / "last.ckpt").exists()
