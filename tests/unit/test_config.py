import pytest
from omegaconf import OmegaConf

from checkfree.config import ConfigError, TrainConfig, load_config, to_yaml

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.d_modle=64"], "unknown config key 'model.d_modle'. Did you mean 'model.d_model' (residual width)?"),
        (["recovery.stratgy=copy"], "Did you mean 'recovery.strategy' (how a lost stage is recovered: none, checkfree"),
        (["num_step=3"], "unknown config key 'num_step'"),
        (["optim.lr=fast"], "bad value for config key 'optim.lr': Value 'fast'"),
        (["model.num_stages=many"], "bad value for config key 'model.num_stages'"),
        (["model.num_layers=10"], "model.num_layers=10 must be divisible by model.num_stages=4"),
        (["model.num_stages=3", "model.num_layers=6"], "checkfree_plus needs model.num_stages >= 4"),
        (
            ["recovery.strategy=checkfree", "pipeline.swap=true", "model.num_stages=2", "model.num_layers=4"],
            "pipeline.swap=true needs model.num_stages >= 4",
        ),
        (["recovery.strategy=teleport"], "recovery.strategy='teleport' is not one of none, checkfree"),
        (["recovery.strategy=none"], "recovery.strategy=none is the failure-free reference but failures.mode='hourly'"),
        (["recovery.strategy=checkpoint"], "recovery.strategy=checkpoint needs checkpoint.every_steps >= 1"),
        (["failures.mode=trace"], "failures.trace_path is required"),
        (["failures.mode=sometimes"], "failures.mode='sometimes' is not one of"),
        (["failures.stages=[0,9]"], "failures.stages=[0, 9]: [9] out of range 0..3"),
        (["data.source=text"], "data.path is required when data.source='text'"),
        (["pipeline.schedule=zigzag"], "pipeline.schedule='zigzag' is not one of gpipe, 1f1b"),
        (["device=tpu"], "device='tpu' must be cpu, cuda or cuda:N"),
        (["num_steps"], "overrides must be key=value"),
    ],
)
def test_config_errors_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    assert message in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  num_stage: 4\n")
    with pytest.raises(
        ConfigError, match=r"typo.yaml: unknown config key 'model.num_stage'. Did you mean 'model.num_stages'"
    ):
        load_config([typo])


def test_precedence_defaults_files_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("num_steps: 10\nseed: 1\n")
    b.write_text("num_steps: 20\n")
    cfg = load_config([a, b], ["num_steps=30"])
    assert (cfg.num_steps, cfg.seed, cfg.model.d_model) == (30, 1, 128)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model.d_model, int)


def test_tiny_yaml_spells_out_the_defaults():
    assert OmegaConf.to_container(
        OmegaConf.structured(load_config([ROOT / "configs/tiny.yaml"]))
    ) == OmegaConf.to_container(OmegaConf.structured(load_config()))


@pytest.mark.parametrize(
    "name,stages,layers,d_model", [("small", 4, 12, 512), ("medium", 6, 24, 1024), ("large", 6, 24, 2048)]
)
def test_paper_configs_load(name, stages, layers, d_model):
    cfg = load_config([ROOT / f"configs/{name}.yaml"])
    m = cfg.model
    assert (m.num_stages, m.num_layers, m.d_model, m.layers_per_stage) == (stages, layers, d_model, layers // stages)
    assert cfg.recovery.strategy == "checkfree_plus" and cfg.swap_enabled


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config([], ["num_steps=7", "recovery.lr_factor=1.2"])
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config([p]) == cfg


def test_every_key_has_a_one_line_doc_from_its_field():
    from checkfree.config import config_docs

    docs = config_docs()
    assert len(docs) > 100
    assert [k for k, (_, doc) in docs.items() if not doc] == []
    assert docs["model.d_model"] == ("int", "residual width")


def test_show_with_docs_is_the_resolved_yaml_with_each_key_explained():
    import yaml

    from checkfree.config import load_config, show

    cfg = load_config([], ["model.d_model=64"])
    plain, documented = show(cfg), show(cfg, docs=True)
    assert yaml.safe_load(plain) == yaml.safe_load(documented)  # the docs are comments only
    line = next(line for line in documented.splitlines() if line.strip().startswith("d_model:"))
    assert line.strip() == "d_model: 64  # residual width [int, default 128]"


def test_a_yaml_file_that_is_not_a_mapping_is_refused_by_name(tmp_path):
    from checkfree.config import ConfigError, load_config

    f = tmp_path / "list.yaml"
    f.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match=r"holds a YAML list at its top level; expected a mapping"):
        load_config([f])


def test_an_unknown_key_hint_quotes_the_suggested_keys_doc():
    from checkfree.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"Did you mean 'model.num_layers' \(transformer blocks in the whole model\)"):
        load_config([], ["model.num_layer=3"])


def test_resume_mismatch_names_what_a_resume_may_not_change():
    from checkfree.config import load_config, resume_mismatch

    saved = load_config()
    assert (
        resume_mismatch(saved, load_config([], ["num_steps=999", "progress=false", "checkpoint.every_steps=5"])) == []
    )
    assert resume_mismatch(saved, load_config([], ["optim.lr=0.1", "seed=3"])) == [
        "optim.lr: saved 0.0006, now 0.1",
        "seed: saved 0, now 3",
    ]


def test_the_strategy_doc_lists_every_strategy():
    from checkfree.config import config_docs
    from checkfree.core.recovery import STRATEGIES

    assert ", ".join(STRATEGIES) in config_docs()["recovery.strategy"][1]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs"])
def test_a_run_name_that_is_no_plain_folder_name_is_refused(name):
    # overwrite=true deletes OUT_DIR/RUN_NAME: an empty name would delete every run in OUT_DIR
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        load_config([], [f"run_name='{name}'"])
