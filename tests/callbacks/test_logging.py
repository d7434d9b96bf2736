"""What a run tells its loggers: the whole resolved config as hyperparameters, and a W&B id unique to the run
directory that a resume keeps."""
import pytest
import yaml

from conftest import TINY_AE, compose_run, restored_environ, run_main


def _fit(root, *extra):
    from ldm.tasks import fit

    with restored_environ():
        return fit.run(compose_run("shapes_autoencoder", [f"paths.root_dir={root}", *TINY_AE, "callbacks=none",
                                                          "trainer.val_check_interval=2", *extra]))


def _wandb_run_id(root, steps: int) -> str:
    """Fit with the (offline) W&B logger; the id of the W&B run it logged to."""
    import wandb

    trainer = _fit(root, "logger=wandb", f"trainer.max_steps={steps}")
    assert trainer.global_step == steps
    run_id = trainer.logger.experiment.id
    wandb.finish()  # in-process: the next fit must start its own W&B run
    return run_id


@pytest.mark.slow
def test_wandb_run_id_is_unique_per_run_directory_and_kept_on_resume(tmp_path):
    first = _wandb_run_id(tmp_path / "a", steps=2)
    assert first == (tmp_path / "a" / "experiments" / "shapes_autoencoder" / "run_id").read_text()
    assert _wandb_run_id(tmp_path / "a", steps=3) == first  # resumed: the same W&B run continues
    assert _wandb_run_id(tmp_path / "b", steps=2) != first  # the same name in another project: another run


@pytest.mark.slow
def test_every_logger_gets_the_resolved_config_as_hyperparameters(tmp_path):
    trainer = _fit(tmp_path, "logger=csv", "trainer.max_steps=2", "model.lr=0.0123")
    with open(f"{trainer.logger.log_dir}/hparams.yaml") as f:
        hparams = yaml.safe_load(f)
    assert hparams["model"]["lr"] == 0.0123 and hparams["name"] == "shapes_autoencoder"
    assert hparams["paths"]["run_dir"] == str(tmp_path / "experiments" / "shapes_autoencoder")


@pytest.mark.slow
def test_progress_is_a_line_every_n_steps_in_steps_of_max_steps_when_not_a_terminal(tmp_path, capsys):
    from ldm.callbacks.step_progress import progress_line

    assert progress_line(120, 750, 2.0, 128.0, 0.5) == \
        "step 120/750  2.00 steps/s  128.0 images/s  ETA 5:15  loss 0.5000"
    quiet = [o for o in TINY_AE if "enable_progress_bar" not in o]
    from ldm.tasks import fit

    with restored_environ():
        fit.run(compose_run("shapes_autoencoder", [f"paths.root_dir={tmp_path}", *quiet, "callbacks=none",
                                                   "trainer.max_steps=6", "trainer.log_every_n_steps=3",
                                                   "trainer.val_check_interval=6"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]  # pytest's stdout is no terminal
    assert all("images/s" in line and "ETA" in line and "loss" in line for line in lines)
    assert "Epoch" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_keeps_its_own_metrics_csv_and_curves_across_a_resume(tmp_path):
    from ldm.callbacks.run_metrics import read_rows

    run_dir = tmp_path / "experiments" / "shapes_autoencoder"
    _fit(tmp_path, "trainer.max_steps=4", "trainer.log_every_n_steps=2", "logger=[]")  # no logger at all
    rows = read_rows(run_dir / "metrics.csv")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "val/psnr" in r] == [2, 4] and all(r["lr"] == 2e-3 for r in rows)
    assert (run_dir / "curves.png").stat().st_size > 0
    _fit(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=2", "logger=[]")
    assert [r["step"] for r in read_rows(run_dir / "metrics.csv") if "train/loss" in r] == [2, 4, 6]


@pytest.mark.slow
def test_a_run_starts_without_a_screen_of_warnings(tiny_runs):
    """What a user sees from `python main.py +experiment=shapes_txt2img`: the model summary, the [fit] lines and
    progress, no warnings (known ones are silenced with their reasons in ldm/utils/known_noise.py)."""
    result = run_main("+experiment=shapes_txt2img", *tiny_runs.ldm_overrides, "name=startup", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "trainer.enable_progress_bar=true")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "[fit] fresh start" in output and "step 2/2" in output
    assert not [line for line in output.splitlines() if "warn" in line.lower()]
