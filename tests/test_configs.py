"""Every experiment composes, and every config group option binds to the dataclass or function it names."""
from __future__ import annotations

import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT
from train.pipeline.stages import STAGES, sections

CONF = REPO_ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = sections()  # every section a stage of the stage table or the run reads (online included)
# Options that need a value the user must supply (`???`).
NEEDS_USER_VALUE = {("target", "local_dir"): ["target.location=/some/dir"], ("data", "jsonl"): ["data.location=x"],
                    ("data", "hf"): ["data.location=x"], ("corpus", "text"): ["corpus.location=x"],
                    ("eval_data", "jsonl"): ["eval_data.location=x"]}


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def bind(node) -> None:
    """Instantiate small spec dataclasses; for functions (losses) check the keyword arguments bind."""
    if OmegaConf.select(node, "_partial_"):
        function = get_method(node._target_)
        keywords = {k: v for k, v in node.items() if not k.startswith("_")}
        inspect.signature(function).bind_partial(**keywords)
    else:
        instantiate(node, _convert_="all")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_binds(experiment):
    config = compose_config([f"+experiment={experiment}"])
    assert config.experiment == experiment
    for group in GROUPS:
        bind(config[group])
    OmegaConf.to_container(config, resolve=True)


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_binds(group, option):
    config = compose_config([f"{group}={option}", *NEEDS_USER_VALUE.get((group, option), [])])
    bind(config[group])


def test_quickstart_trains_an_eagle3_drafter_for_the_real_target():
    config = compose_config(["+experiment=quickstart"])
    assert config.target.kind == "wheel_gguf" and config.target.name == "SmolLM2-135M-Instruct"
    assert config.stages == ["data_gen", "distill", "eval", "export"]
    assert config.drafter._target_ == "models.feature_drafter.FeatureDrafterSpec" and config.drafter.layout == "eagle3"
    assert config.distill.feature_cache and config.eval.hybrid == ["prompt_lookup"]
    assert config.eval.merged == ["prompt_lookup+ngram"] and config.eval.merged_tree == [2]
    assert instantiate(config.eval, _convert_="all").merged_min_probability == "auto"  # measured, not set
    standalone = compose_config(["+experiment=standalone"])  # the previous default, kept as a recipe
    assert standalone.stages == ["data_gen", "pretrain", "distill", "eval", "export"]
    assert standalone.drafter._target_ == "models.drafter.DrafterSpec"
    assert standalone.data == config.data and standalone.data_gen == config.data_gen  # the same answers


def test_bad_key_is_a_clear_error():
    with pytest.raises(Exception, match="no_such_key"):
        compose_config(["+experiment=smoke", "pretrain.no_such_key=3"])
    config = compose_config(["+experiment=smoke", "+drafter.colour=blue"])
    with pytest.raises(Exception, match="colour"):
        instantiate(config.drafter)


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = readme.split("<!-- test-command -->")[1].split("```")[1].strip().splitlines()[-1]
    assert command in ci, f"README's test command {command!r} is not in .ci/run"


def test_pretrain_and_distill_take_their_optimizer_from_the_optim_group():
    shared = OmegaConf.load(CONF / "optim" / "adamw.yaml")
    for experiment in EXPERIMENTS:
        config = compose_config([f"+experiment={experiment}"])
        for stage in ("pretrain", "distill"):
            optim = config[stage].optim
            assert set(optim) == set(shared), (experiment, stage)
            bind(optim)
    default = compose_config([])
    assert default.distill.optim.lr == shared.lr and default.pretrain.optim.lr == 3.0e-3  # pretrain's own rate
    assert compose_config(["distill.optim.lr=0.5"]).distill.optim.lr == 0.5


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_the_sweep_launchers_compose_from_the_cluster_settings(launcher):
    """hydra/launcher=slurm|local: the plugin's schema with its sizes taken from conf/cluster/ (here the GPU example
    with a partition set on the command line)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        config = compose("config", overrides=[f"hydra/launcher={launcher}", "+experiment=llama8b_eagle3",
                                              "cluster.partition=h100"], return_hydra_config=True)
    node = OmegaConf.to_container(config.hydra.launcher, resolve=False)
    assert node["_target_"].endswith("SlurmLauncher" if launcher == "slurm" else "LocalLauncher")
    resolved = {key: OmegaConf.select(config, f"hydra.launcher.{key}") for key in ("timeout_min", "gpus_per_node",
                                                                                     "mem_gb", "cpus_per_task")}
    assert resolved == {"timeout_min": 240, "gpus_per_node": 1, "mem_gb": 128, "cpus_per_task": 16}
    if launcher == "slurm":
        assert config.hydra.launcher.partition == "h100" and config.hydra.launcher.signal_delay_s == 180


def test_the_gpu_recipe_asks_for_what_its_comment_says():
    config = compose_config(["+experiment=llama8b_eagle3"])
    assert config.target.kind == "hub" and config.data_gen.backend == "vllm"
    assert config.data_gen.vllm.tensor_parallel_size == config.cluster.data_gen.gpus == 8
    assert config.deepspeed.enabled and config.deepspeed.bf16 and config.deepspeed.stage == 2
    assert config.cluster.train.nodes * config.cluster.train.processes_per_node == 16


def test_every_stage_of_the_table_has_its_conf_group_and_reads_only_its_sections():
    """A stage is one module and one conf group of its name (selected in config.yaml), registered in the stage
    table: its run_stage takes its own section as `settings` and, by name, only sections of its fingerprint."""
    config = compose_config([])
    for name, stage in STAGES.items():
        assert (CONF / name).is_dir() and name in config and name in stage.sections, name
        parameters = [p for p in inspect.signature(stage.run).parameters if p != "run"]
        assert parameters[0] == "settings" and set(parameters[1:]) <= set(stage.sections), (name, parameters)
        bind(config[name])
