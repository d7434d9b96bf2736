"""The one set of sampling settings (config group `sampling/`), shared by task=sample, task=evaluate, the image grids
logged while training and periodic evaluation, and the jobs (one image each) they describe."""
from collections.abc import Sequence
from dataclasses import dataclass

from ldm.models.generate import Job, check_sampling


def conditions(prompts: Sequence[str] | None, labels: Sequence[int] | None) -> list[tuple[str, int]]:
    """(prompt, label) pairs: prompts without a class (-1), or class labels with an empty prompt."""
    return [(p, -1) for p in prompts or ()] or [("", int(y)) for y in labels or ()]


@dataclass(frozen=True)
class Sampling:
    """How images are drawn from a trained model, and the experiment's own conditions to show.

    `eta`: the stochastic samplers' noise (ddim, dpmpp_2m_sde); None keeps each sampler's default.
    `seeds`: the columns of a prompts x seeds grid; `seed_offset`: sample i of an evaluation uses seed_offset + i.
    `prompts`/`labels`: the training grids' rows and task=sample's default conditions.
    """

    sampler: str = "euler"
    steps: int = 30
    schedule: str = "default"
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.0
    eta: float | None = None
    seeds: Sequence[int] = (0, 1, 2, 3)
    seed_offset: int = 0
    batch_size: int = 64
    use_ema: bool = True
    prompts: Sequence[str] | None = None
    labels: Sequence[int] | None = None

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0 or not self.seeds:
            raise ValueError(f"sampling needs steps > 0, batch_size > 0 and seeds, got {self.steps=}, "
                             f"{self.batch_size=}, {self.seeds=}")
        check_sampling(self.sampler, self.schedule)  # an unknown name fails at start-up, not at the first grid
        for name in ("seeds", "prompts", "labels"):  # plain tuples, whatever the config handed in
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else tuple(value))

    def job(self, prompt: str, label: int, seed: int) -> Job:
        return Job(prompt, label, seed, self.sampler, self.steps, self.guidance_scale)

    def grid_jobs(self, conds: list[tuple[str, int]]) -> list[list[Job]]:
        """A row per condition, a column per seed."""
        return [[self.job(p, y, s) for s in self.seeds] for p, y in conds]

    def numbered_jobs(self, conds: list[tuple[str, int]]) -> list[Job]:
        """One image per condition, condition i with seed seed_offset + i: the same images at every evaluation."""
        return [self.job(p, y, self.seed_offset + i) for i, (p, y) in enumerate(conds)]

    def sampler_options(self) -> dict:
        """Keyword arguments for the sampler beyond the shared ones."""
        return {} if self.eta is None else {"eta": self.eta}
