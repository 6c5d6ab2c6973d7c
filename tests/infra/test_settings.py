"""Every setting is checked before anything loads (infra/settings.py, train/run.check_settings): the issue's probes,
as a user types them, each get one error naming the key, the value and what is allowed."""
from __future__ import annotations

import time

import pytest

from infra.settings import SettingsError, check_fields
from tests.conftest import REPO_ROOT
from tests.test_configs import EXPERIMENTS, compose_config
from train.distill import DistillSettings
from train.pipeline.runner import check_settings

PROBES = [  # (override, what the error must say)
    ("distill.epochs=-1", "distill.epochs=-1: must be ≥ 1"),
    ("distill.epochs=0", "distill.epochs=0: must be ≥ 1"),
    ("pretrain.steps=-5", "pretrain.steps=-5: must be ≥ 1"),
    ("data.limit=-1", "data.limit=-1: must be ≥ 1 (or null)"),
    ("data.offset=-2", "data.offset=-2: must be ≥ 0"),
    ("distill.epochs=abc", "distill.epochs='abc': must be an integer"),
    ("data_gen.max_prompt_tokens=null", "data_gen.max_prompt_tokens=null: must be an integer"),
    ("+distill.epochz=2", "distill.epochz is not a setting of distill (train.distill.DistillSettings); did you mean "
                          "distill.epochs?"),
    ("+data_gen.sampling.tempreature=1", "did you mean data_gen.sampling.temperature?"),
    ("distill.optim.lr=nan", "distill.optim.lr=nan: must be a finite number > 0"),
    ("pretrain.optim.betas=[0.9,1.5]", "pretrain.optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
    ("loss.terms.fkl.weight=abc", "loss.terms.fkl.weight='abc': must be a number ≥ 0"),
    ("drafter.num_layers=0", "drafter.num_layers=0: must be ≥ 1"),
    ("eval.decode.gamma=0", "eval.decode.gamma=0: must be ≥ 1"),
    ("data_gen.on_policy_ratio=2", "data_gen.on_policy_ratio=2: must be a number in [0, 1]"),
    ("resume=sometimes", "resume='sometimes': must be one of ['auto', 'never']"),
    ("+distil.epochs=2", "distil is not a setting"),
    ("worker.rank=3", "worker.rank=3 must be in [0, worker.world_size=1)"),
    ("deepspeed=zero1", "deepspeed.enabled=true (ZeRO stage 1) trains through a distributed launcher, and this process "
                        "was started without one. Run `torchrun --nproc_per_node=N train/run.py"),
    ("run_name=../../../x", "run_name='../../../x': must be a name inside runs_root"),
    ("run_name=/tmp/elsewhere", "run_name='/tmp/elsewhere': must be a name inside runs_root"),
    ("export.name=../../../../../x", "export.name='../../../../../x': must be a plain folder name"),
]


def probe(tmp_path, *overrides: str):
    config = compose_config(["+experiment=smoke", f"runs_root={tmp_path / 'runs'}", *overrides])
    return check_settings(config)


@pytest.mark.parametrize("override,message", PROBES, ids=[p[0] for p in PROBES])
def test_a_bad_setting_is_named_with_what_is_allowed(tmp_path, override, message):
    started = time.perf_counter()
    with pytest.raises(SettingsError) as refused:
        probe(tmp_path, override)
    assert message in str(refused.value)
    assert time.perf_counter() - started < 10  # seconds, not after a model loads
    assert not (tmp_path / "runs" / "smoke").exists()  # nothing was written


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_passes_the_checks(tmp_path, experiment):
    config = compose_config([f"+experiment={experiment}", f"runs_root={tmp_path}"])
    # an experiment with DeepSpeed on is meant for a launcher (slurm/pipeline.py's training job is one)
    stages, run_dir = check_settings(config, launched=bool(config.deepspeed.enabled))
    assert stages == list(config.stages) and run_dir == tmp_path / experiment / "default"


@pytest.mark.parametrize("drafter,loss", [("eagle", "eagle"), ("eagle3", "eagle3"), ("fspad", "fspad"),
                                          ("smollm2_layers_2", "tvdpp")])
def test_every_drafter_and_loss_group_passes_the_checks(tmp_path, drafter, loss):
    probe(tmp_path, f"drafter={drafter}", f"loss={loss}")


def test_eval_without_any_drafter_is_refused_before_it_decodes(tmp_path):
    with pytest.raises(SettingsError, match="eval has no drafter to evaluate"):
        probe(tmp_path, "stages=[eval]", "eval.include_untrained=false")
    probe(tmp_path, "stages=[eval]", "eval.include_untrained=false", "+eval.drafters.mine=/some/drafter")


def test_an_unwritable_runs_root_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SettingsError, match=f"runs_root={blocker}/runs: cannot write there"):
        check_settings(compose_config(["+experiment=smoke", f"runs_root={blocker / 'runs'}"]))


def test_settings_built_in_python_are_checked_too():
    with pytest.raises(SettingsError, match="epochs=0: must be ≥ 1"):
        DistillSettings(epochs=0)
    with pytest.raises(SettingsError, match="max_steps=2.5: must be an integer or null"):
        DistillSettings(max_steps=2.5)
    check_fields(DistillSettings(max_steps=None, init_from=str(REPO_ROOT)))
