"""trainer.precision=auto: bf16 only where a probe measured it faster; explicit precisions pass through."""
import re

from conftest import TINY_AE, compose_run, restored_environ
from ldm.utils.precision import MARGIN, choose, resolve_precision


def test_bf16_only_when_clearly_faster():
    assert choose(1.0, 0.6) == "bf16-mixed"
    assert choose(1.0, MARGIN * 1.01) == "32-true"  # a near tie keeps fp32's exactness
    assert choose(1.0, 11.7) == "32-true"  # a CPU without bf16 units (measured 11.7x slower on one)


def test_explicit_precisions_pass_through_and_several_cpu_ranks_agree_on_fp32():
    assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", "as configured")
    assert resolve_precision("auto", "cpu", world_size=2)[0] == "32-true"


def test_auto_measures_this_cpu_and_the_fit_says_what_it_chose(tmp_path, capsys):
    from ldm.tasks import fit

    precision, why = resolve_precision("auto", "cpu")
    ratio = float(re.search(r"took (\d+\.\d+)x the fp32 time", why).group(1))
    assert precision == choose(1.0, ratio) or abs(ratio - MARGIN) < 0.05  # the printed ratio rounds to 2 digits
    with restored_environ():
        trainer = fit.run(compose_run("shapes_autoencoder", [f"paths.root_dir={tmp_path}", *TINY_AE, "callbacks=none",
                                                             "trainer.max_steps=1", "trainer.precision=auto"]))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[fit] precision"))
    assert f"{trainer.precision} (trainer.precision=auto: bf16 autocast took" in line
    assert trainer.precision in ("32-true", "bf16-mixed")
    stored = (tmp_path / "experiments" / "shapes_autoencoder" / "config.yaml").read_text()
    assert "precision: auto" in stored  # the run stays "auto": a resume on another CPU measures again
