from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config


def test_defaults_without_file(tmp_path: Path):
    config = load_config(environ={"XDG": "unused"}, path=None, home=tmp_path / "home")
    assert config.model.path is None
    assert config.model.backend == "llama_cpp"
    assert config.schedule.interval_minutes == 60.0
    assert config.tasks.books == ()
    assert config.home == tmp_path / "home"


def test_file_values_and_relative_paths(tmp_path: Path):
    file = tmp_path / "config.toml"
    file.write_text(
        'home = "state"\n'
        '[model]\npath = "models/m.gguf"\nthreads = 3\n'
        "[schedule]\ninterval_minutes = 15\n"
        '[tasks]\nbooks = ["books/a.toml", "/abs/b.toml"]\nmax_per_cycle = 4\n'
    )
    config = load_config(file, environ={})
    assert config.home == tmp_path / "state"
    assert config.model.path == tmp_path / "models/m.gguf"
    assert config.model.threads == 3
    assert config.schedule.interval_minutes == 15.0
    assert config.tasks.books == (tmp_path / "books/a.toml", Path("/abs/b.toml"))
    assert config.tasks.max_per_cycle == 4
    assert config.source == file


def test_environment_overrides_file(tmp_path: Path):
    file = tmp_path / "config.toml"
    file.write_text("[model]\nthreads = 3\n")
    environ = {
        "A3X_MODEL__THREADS": "5",
        "A3X_SCHEDULE__RUN_ON_START": "yes",
        "A3X_HOME": str(tmp_path / "envhome"),
        "A3X_MODEL__PATH": "/models/x.gguf",
    }
    config = load_config(file, environ=environ)
    assert config.model.threads == 5
    assert config.schedule.run_on_start is True
    assert config.home == tmp_path / "envhome"
    assert config.model.path == Path("/models/x.gguf")


def test_flag_home_beats_environment(tmp_path: Path):
    config = load_config(home=tmp_path / "flag", environ={"A3X_HOME": str(tmp_path / "env")})
    assert config.home == tmp_path / "flag"


def test_unknown_key_named(tmp_path: Path):
    file = tmp_path / "config.toml"
    file.write_text("[model]\nthread = 3\n")
    with pytest.raises(
        ConfigError, match=rf"{file}: \[model\]: unknown key 'thread'; valid keys: "
    ):
        load_config(file, environ={})


def test_wrong_type_named(tmp_path: Path):
    file = tmp_path / "config.toml"
    file.write_text('[schedule]\ninterval_minutes = "hourly"\n')
    with pytest.raises(ConfigError, match=r"interval_minutes must be a number, got 'hourly'"):
        load_config(file, environ={})


def test_bad_environment_value_names_variable():
    with pytest.raises(ConfigError, match=r"A3X_MODEL__THREADS must be an integer, got 'many'"):
        load_config(environ={"A3X_MODEL__THREADS": "many"})


def test_unknown_environment_section():
    with pytest.raises(ConfigError, match="A3X_MODLE__PATH names unknown section 'modle'"):
        load_config(environ={"A3X_MODLE__PATH": "/x"})


def test_unknown_backend_rejected():
    with pytest.raises(
        ConfigError, match="backend 'onnx' is unknown; use one of: llama_cpp, transformers"
    ):
        load_config(environ={"A3X_MODEL__BACKEND": "onnx"})


def test_invalid_toml_named(tmp_path: Path):
    file = tmp_path / "config.toml"
    file.write_text("[model\n")
    with pytest.raises(ConfigError, match=f"config file {file} is not valid TOML"):
        load_config(file, environ={})


def test_missing_explicit_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", environ={})


def test_routing_off_by_default():
    config = load_config(environ={})
    assert config.routing.enabled is False
    assert config.routing.combination == "linear"


def test_routing_section_read(tmp_path: Path):
    file = tmp_path / "config.toml"
    file.write_text(
        '[model]\nbackend = "transformers"\n'
        '[routing]\nenabled = true\ntop_k = 3\nfloor = 0.5\ncombination = "ties_svd"\n'
    )
    config = load_config(file, environ={})
    assert config.routing.enabled is True
    assert config.routing.top_k == 3
    assert config.routing.floor == 0.5
    assert config.routing.combination == "ties_svd"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("A3X_ROUTING__TOP_K", "0", r"\[routing\] top_k is 0; it must be at least 1"),
        ("A3X_ROUTING__TEMPERATURE", "0", r"\[routing\] temperature is 0.0; it must be above 0"),
        ("A3X_ROUTING__FLOOR", "1.5", r"\[routing\] floor is 1.5; it must be a cosine similarity"),
        ("A3X_ROUTING__DENSITY", "0", r"\[routing\] density is 0.0; it must be above 0 and at"),
        ("A3X_ROUTING__COMBINATION", "cat", r"combination 'cat' is unknown; use one of: linear"),
        ("A3X_ROUTING__COMBINATION", "ties", r"'ties' needs model.backend = \"transformers\""),
    ],
    ids=["top_k", "temperature", "floor", "density", "unknown", "llama_cpp"],
)
def test_routing_values_checked(variable, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ={variable: value})


def test_adapter_budget_reaches_the_backend_setting():
    assert load_config(environ={}).model.adapter_budget_mb == 256
    assert load_config(environ={"A3X_MODEL__ADAPTER_BUDGET_MB": "64"}).model.adapter_budget_mb == 64
    with pytest.raises(ConfigError, match=r"\[model\] adapter_budget_mb is 0; it must be at"):
        load_config(environ={"A3X_MODEL__ADAPTER_BUDGET_MB": "0"})
