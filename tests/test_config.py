import pytest

from hierfedlora.config import ConfigError, build_config, load_config


def test_defaults_are_the_documented_default_experiment():
    cfg = build_config({})
    assert (cfg.model.name, cfg.data.name, cfg.fleet.name, cfg.fleet.num_devices, cfg.partition.kind) == (
        "minilm", "rotten_tomatoes", "jetson80", 20, "dirichlet_device")
    assert cfg.method["name"] == "fedlora"


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate'|unknown key 'train.lr_'"):
        build_config({"train": {"lr_": 1e-3}})
    with pytest.raises(ConfigError, match=r"'model.rnak'.*Did you mean 'rank'"):
        build_config({}, ["model.rnak=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*Did you mean 'model'"):
        build_config({"modle": {}})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"bad value for 'model.rank'"):
        build_config({}, ["model.rank=0"])
    with pytest.raises(ConfigError, match=r"bad value for 'partition.kind'"):
        build_config({}, ['partition.kind="skewed"'])
    with pytest.raises(ConfigError, match=r"fleet.bytes_per_param"):
        build_config({}, ["fleet.bytes_per_param=3"])


def test_unknown_method_and_method_keys():
    with pytest.raises(ValueError, match=r"unknown method.name 'fedlorra'.*Did you mean 'fedlora'"):
        build_config({"method": {"name": "fedlorra"}})
    with pytest.raises(ConfigError, match=r"unknown key 'method.foo'"):
        build_config({"method": {"name": "fedlora", "foo": 1}})


def test_overrides_and_files(tmp_path):
    cfg = build_config({}, ["train.lr=5e-4", 'data.name="trec"', "run.target_acc=0.8"])
    assert cfg.train.lr == 5e-4 and cfg.data.name == "trec" and cfg.run.target_acc == 0.8
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 0.01\n")
    assert load_config(p).train.lr == 0.01
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_single_run_ignores_compare_variants(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[method]\nname = "fedlora"\n[variants.x]\nname = "hierfedlora"\nfixed_tau = 1\n')
    assert load_config(p).method == {"name": "fedlora"}


@pytest.mark.parametrize("override, key", [
    ('run.rounds="3"', "run.rounds"),            # a string is not an int
    ("run.seed=true", "run.seed"),               # nor is a boolean
    ('run.progress="yes"', "run.progress"),      # a string is not a boolean
    ("train.lr=inf", "train.lr"),                # inf and nan are not values (TOML reads them)
    ("model.alpha=nan", "model.alpha"),
    ("run.seed=-1", "run.seed"),
    ("run.seed=18446744073709551616", "run.seed"),
])
def test_lax_values_are_refused_and_named(override, key):
    with pytest.raises(ConfigError, match=rf"bad value for '{key}'"):
        build_config({}, [override])


def test_method_name_must_be_text_and_a_method_without_settings_says_so():
    with pytest.raises(ConfigError, match=r"'method.name'.*text"):
        build_config({}, ["method.name=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'method.depth'.*takes no settings"):
        build_config({"method": {"name": "fedlora", "depth": 2}})


def test_legend_depths_must_be_ordered():
    with pytest.raises(ConfigError, match=r"depth_min = 4 exceeds method.depth_max = 2"):
        build_config({"method": {"name": "legend", "depth_min": 4, "depth_max": 2}})


def test_null_resets_an_optional_key():
    assert build_config({"run": {"target_acc": 0.8}}, ["run.target_acc=null"]).run.target_acc is None
    with pytest.raises(ConfigError, match=r"bad value for 'run.rounds'"):
        build_config({}, ["run.rounds=null"])  # a required value cannot be unset


def test_the_cli_turns_bad_values_into_one_line(capsys):
    from hierfedlora.cli import main

    assert main(["run", "--set", "train.lr=inf", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err


def test_bad_devices_files_and_directories_are_named_before_anything_is_written(tmp_path, capsys):
    import torch

    from hierfedlora.cli import main

    assert main(["run", "--set", "train.device=gpu", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "'gpu' is not a device: use auto, cpu, cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", "--set", "train.device=cuda", "--out", str(tmp_path / "b"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert 'train.device = "cuda" but' in err and 'use train.device = "cpu"' in err and "Traceback" not in err
        assert not (tmp_path / "b").exists()  # refused before the run directory was made
    assert main(["compare", str(tmp_path / "nosuch.toml"), "--methods", "fedlora", "--out", str(tmp_path / "c")]) == 2
    assert "config file" in capsys.readouterr().err and not (tmp_path / "c").exists()
    (tmp_path / "afile").write_text("keep me")
    assert main(["run", "--set", "run.rounds=1", "--out", str(tmp_path / "afile"), "--quiet"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_every_shipped_config_and_its_variants_load():
    """Each file in configs/ is valid as shipped, and so is every [variants.X] it defines (a typo in a
    variant would otherwise surface only when a comparison reaches it)."""
    from pathlib import Path

    from hierfedlora.compare import method_config, read_variants

    files = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml"))
    assert len(files) >= 10
    for path in files:
        load_config(path)
        raw, variants = read_variants(path)
        for label in variants:
            assert method_config(raw, variants, label, 0, []).method["name"] == variants[label]["name"], (path, label)
