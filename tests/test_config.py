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
