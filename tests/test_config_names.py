"""Config names: a built-in name is found wherever the user stands; a folder of the same name does not shadow it."""
import pytest

from dermfusion.config import ConfigError, load_config, resolve_config_path


def test_a_folder_named_like_a_builtin_config_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. the output folder of an earlier `dermfusion demo --out demo`
    assert resolve_config_path("demo").suffix == ".yaml"
    assert load_config("demo").name == "demo"


def test_a_folder_that_is_no_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_experiment").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_config_path("my_experiment")


def test_a_yaml_file_path_wins(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text((resolve_config_path("tiny_cpu")).read_text())
    assert resolve_config_path(f) == f
