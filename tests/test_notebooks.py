"""The worked examples in notebooks/ run top to bottom, and what they print is right: the sampler notebook's
Euler errors equal a closed form computed here, and the convergence orders it claims hold; the checkpoint, latent
cache and run-directory notebooks, pointed at the tiny trained runs, print what those runs hold."""
import csv
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import TINY_TXT2IMG, compose_run, restored_environ
from ldm.data.latent_cache import read_manifest
from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.step_schedules import karras_sigmas

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path) -> nbformat.NotebookNode:
    """Run the notebook top to bottom (its own asserts included); the kernel inherits os.environ."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook's code cells printed to stdout."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("name") == "stdout")


def figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def run_notebook(path: Path) -> str:
    return printed(execute(path))


def notebook(stem: str) -> Path:
    return next(p for p in NOTEBOOKS if p.stem == stem)


def euler_std_error(steps: int, mu: float = 0.5, s: float = 0.3, n: int = 4000) -> float:
    """Closed form of the notebook's experiment for Euler: with the exact denoiser of N(mu, s^2) data,
    D(x) - mu = a (x - mu) with a = s^2 / (s^2 + sigma^2), so every Euler step scales x - mu by
    1 + (1 - a_i) (sigma_{i+1} - sigma_i) / sigma_i, and the samples' std is sigma_0 * prod(factors) * std(noise)."""
    sigmas = karras_sigmas(steps, 0.002, 80.0).double()
    factor = sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        a = s**2 / (s**2 + sigma**2)
        factor = factor * (1 + (1 - a) * (sigma_next - sigma) / sigma)
    noise = SampleNoise(range(n)).randn((1,)).double()
    return abs((factor * noise).std().item() - s)


def test_every_notebook_is_tested():
    assert {p.stem for p in NOTEBOOKS} == {"samplers_on_an_exact_denoiser", "sample_from_a_checkpoint",
                                           "inspect_a_latent_cache", "training_curves_and_evaluation"}


def test_sampler_notebook_prints_the_closed_form_errors_and_the_convergence_orders():
    text = run_notebook(notebook("samplers_on_an_exact_denoiser"))
    errors = {m[1]: [float(v) for v in m[2].split()]
              for m in re.finditer(r"^(\w+)\s+std error at 8/16/32 steps: (.+)$", text, re.M)}
    assert set(errors) == {"euler", "heun", "dpmpp_2m"}
    for printed_error, steps in zip(errors["euler"], (8, 16, 32)):
        assert printed_error == pytest.approx(euler_std_error(steps), rel=0.01)  # printed to 3 digits
    assert all(e[0] > e[1] > e[2] for e in errors.values())  # every sampler converges
    assert 1.6 < errors["euler"][1] / errors["euler"][2] < 2.4  # first order: doubling the steps halves the error
    for second_order in ("heun", "dpmpp_2m"):  # second order: well below Euler at 32 steps
        assert errors[second_order][2] < errors["euler"][2] / 2


def numbers(pattern: str, text: str) -> dict[str, list[float]]:
    """{name: the numbers after it} for each line matching `pattern` (groups: name, space-separated numbers)."""
    return {m[1]: [float(v) for v in m[2].split()] for m in re.finditer(pattern, text, re.M)}


def test_checkpoint_notebook_samples_a_grid_compares_samplers_and_sweeps_guidance(tiny_runs, monkeypatch):
    monkeypatch.setenv("LDM_CHECKPOINT", str(tiny_runs.ldm_ckpt.parents[1]))  # a run directory
    nb = execute(notebook("sample_from_a_checkpoint"))
    text = printed(nb)
    assert f"step={tiny_runs.ldm_steps}" in text and "defaults: euler 2 steps, guidance 3.0" in text  # the run's own
    assert "grid of 1 prompts x 4 seeds, images (3, 16, 16)" in text  # tiny runs: sampling.prompts=[a red circle]
    distances = numbers(r"^(\w+)\s+distance to heun-64 at 4/8/16/32 steps: (.+)$", text)
    assert set(distances) == {"euler", "heun", "dpmpp_2m", "ddim"}
    assert all(d[0] > d[-1] for d in distances.values())  # every deterministic sampler converges to the ODE solution
    assert distances["ddim"] == distances["euler"]  # DDIM (eta 0) is Euler in sigma, as the notebook says
    assert distances["heun"][-1] < distances["euler"][-1] / 2 and distances["dpmpp_2m"][-1] < distances["euler"][-1] / 2
    [moved] = numbers(r"^(distance) from guidance 1 at guidance 1/2/4/7.5: (.+)$", text).values()
    assert moved[0] == 0 and all(a < b for a, b in zip(moved, moved[1:]))
    assert figures(nb) == 3  # the grid, the sampler comparison and the sweep


def test_cache_notebook_matches_the_manifest_and_decodes_with_the_cache_first_stage(tiny_runs, monkeypatch):
    cache = tiny_runs.cache / "train"
    monkeypatch.setenv("LDM_LATENT_CACHE", str(cache))
    monkeypatch.setenv("LDM_FIRST_STAGE", str(tiny_runs.root / "experiments" / "ae"))
    nb = execute(notebook("inspect_a_latent_cache"))
    text = printed(nb)
    manifest = read_manifest(cache)
    assert f"{manifest['num_samples']} latents [4, 8, 8] (float16) of {manifest['num_inputs']} inputs" in text
    channels = re.findall(r"^channel (\d): mean (\S+) \(manifest (\S+)\)  std (\S+) \(manifest (\S+)\)$", text, re.M)
    assert len(channels) == 4
    for c, mean, stored_mean, std, stored_std in channels:
        assert mean == stored_mean == f"{manifest['stats']['mean'][int(c)]:+.4f}"  # recomputed from the records
        assert std == stored_std == f"{manifest['stats']['std'][int(c)]:.4f}"
    assert f"first stage matches the cache: {manifest['first_stage']['hash'][:16]}" in text
    assert "decoded 8 latents to (3, 16, 16) images" in text and figures(nb) == 1
    assert len(re.findall(r"^  \d: a (small|large) \w+ (circle|square|triangle)", text, re.M)) == 8  # their captions


def test_run_notebook_reads_curves_and_evaluation_from_the_run_directory(tiny_runs, shapes_feature_weights, tmp_path,
                                                                       monkeypatch):
    from ldm.tasks import evaluate

    shutil.copytree(tiny_runs.root / "experiments" / "ldm", tmp_path / "experiments" / "ldm")  # evaluate a copy
    overrides = [f"paths.root_dir={tmp_path}", "name=ldm", "first_stage_name=ae", *TINY_TXT2IMG, "task=evaluate",
                 "task.progress=false", "eval.resolution=16", "eval.num_samples=4", "eval.held_out_samples=0",
                 f"eval.feature_weights={shapes_feature_weights}"]
    with restored_environ():
        evaluate.run(compose_run("shapes_txt2img", overrides))
    run_dir = tmp_path / "experiments" / "ldm"
    monkeypatch.setenv("LDM_RUN_DIR", str(run_dir))
    nb = execute(notebook("training_curves_and_evaluation"))
    text = printed(nb)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert f"{len(rows)} rows up to step {tiny_runs.ldm_steps}" in text
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert f"train/loss: first {losses[0]:.4f}" in text and f"last {losses[-1]:.4f}" in text
    assert f"last checkpoint step: {tiny_runs.ldm_steps}" in text
    [result] = json.loads((run_dir / "eval" / "metrics.json").read_text())
    line = next(ln for ln in text.splitlines() if ln.startswith(f"step {tiny_runs.ldm_steps} ["))
    assert f"acc_color {result['acc_color']:.3f}" in line and f"fid_shapes {result['fid_shapes']:.3f}" in line
    assert figures(nb) == 2  # curves, and the metrics over steps
