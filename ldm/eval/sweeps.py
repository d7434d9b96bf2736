"""Sweep tables from evaluation rows: FID against denoiser evaluations (NFE) per sampler, and FID against prompt
alignment (CLIP score, or a suite's accuracy) over guidance scales. Pure functions over the rows' dicts."""
from ldm.diffusion.nfe import nfe
from ldm.utils.errors import ConfigError

SWEEPS = ("none", "samplers", "guidance")


def sweep_grid(sweep: str, samplers: list[str], steps: list[int], guidance: list[float]) -> list[dict]:
    """The sampling settings a sweep visits, as overrides of the shared ones ({} for no sweep)."""
    if sweep == "none":
        return [{}]
    if sweep == "samplers":
        return [dict(sampler=s, steps=int(n)) for s in samplers for n in steps]
    if sweep == "guidance":
        return [dict(guidance_scale=float(g)) for g in guidance]
    raise ConfigError(f"unknown task.sweep {sweep!r}: {' | '.join(SWEEPS)}")


def nfe_table(rows: list[dict], fid_metric: str) -> list[dict]:
    """One point per (sampler, steps): its NFE (guidance included) and FID, ordered by sampler then NFE."""
    points = [dict(sampler=r["sampler"], steps=r["steps"], guidance_scale=r["guidance_scale"],
                   nfe=nfe(r["sampler"], r["steps"], r["guidance_scale"]), n=r["n"], step=r["step"],
                   **{fid_metric: r[fid_metric]}) for r in rows]
    return sorted(points, key=lambda p: (p["sampler"], p["nfe"]))


def guidance_table(rows: list[dict], fid_metric: str, alignment_metric: str) -> list[dict]:
    """One point per guidance scale: prompt alignment and FID (the trade-off guidance moves along), by scale."""
    missing = [r["guidance_scale"] for r in rows if alignment_metric not in r]
    if missing:
        raise ValueError(f"the guidance sweep plots {alignment_metric!r}, which the suite did not score")
    points = [dict(guidance_scale=r["guidance_scale"], sampler=r["sampler"], steps=r["steps"],
                   nfe=nfe(r["sampler"], r["steps"], r["guidance_scale"]), n=r["n"], step=r["step"],
                   **{alignment_metric: r[alignment_metric], fid_metric: r[fid_metric]}) for r in rows]
    return sorted(points, key=lambda p: p["guidance_scale"])


def curves(points: list[dict], by: str, x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    """(x, y) pairs per value of `by`, in the points' order: the lines of a plot."""
    out: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        out.setdefault(str(p[by]), []).append((float(p[x]), float(p[y])))
    return out
