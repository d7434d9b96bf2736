"""The worked examples in notebooks/ run top to bottom, and what they print is right: the sampler notebook's
Euler errors equal a closed form computed here, and the convergence orders it claims hold."""
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.step_schedules import karras_sigmas

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def run_notebook(path: Path) -> str:
    """Execute the notebook (its own asserts included) and return everything its code cells printed."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    assert run_notebook(path)


def test_sampler_notebook_prints_the_closed_form_errors_and_the_convergence_orders():
    printed = run_notebook(next(p for p in NOTEBOOKS if p.stem == "samplers_on_an_exact_denoiser"))
    errors = {m[1]: [float(v) for v in m[2].split()]
              for m in re.finditer(r"^(\w+)\s+std error at 8/16/32 steps: (.+)$", printed, re.M)}
    assert set(errors) == {"euler", "heun", "dpmpp_2m"}
    for printed_error, steps in zip(errors["euler"], (8, 16, 32)):
        assert printed_error == pytest.approx(euler_std_error(steps), rel=0.01)  # printed to 3 digits
    assert all(e[0] > e[1] > e[2] for e in errors.values())  # every sampler converges
    assert 1.6 < errors["euler"][1] / errors["euler"][2] < 2.4  # first order: doubling the steps halves the error
    for second_order in ("heun", "dpmpp_2m"):  # second order: well below Euler at 32 steps
        assert errors[second_order][2] < errors["euler"][2] / 2
