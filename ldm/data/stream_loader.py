"""DataLoader for streaming datasets: numbered passes, kept in checkpoints."""
from torch.utils.data import DataLoader


class StreamLoader(DataLoader):
    """A DataLoader that numbers the passes over a streaming dataset and keeps the count in Lightning checkpoints.

    Pass n calls `dataset.set_epoch(n)` first, so workers, persistent or not, seed it with (seed, n, rank, worker).
    Lightning saves `state_dict()` with the fit loop (the pass in progress counted) and loads it before the first
    batch of a resumed run: a run restarted after preemption draws new samples instead of replaying the old ones.
    """

    passes = 0

    def __iter__(self):
        self.dataset.set_epoch(self.passes)
        self.passes += 1
        return super().__iter__()

    def state_dict(self) -> dict:
        return {"passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.passes = state["passes"]
