"""The environment every Flower process of a run inherits: jemalloc preloaded where it is
installed, and said when it is not (the run's peak memory depends on it)."""

from pathlib import Path

from flowertune_nlp import flower_home


def test_jemalloc_is_preloaded_where_installed_and_its_absence_is_said(tmp_path, monkeypatch,
                                                                         capsys):
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(flower_home, "JEMALLOC_PATHS", (str(library),))
    env = flower_home.flower_environment(tmp_path / "home")
    assert env["LD_PRELOAD"] == str(library)
    assert "jemalloc" not in capsys.readouterr().err

    assert "LD_PRELOAD" not in flower_home.flower_environment(tmp_path / "home", jemalloc=False)
    assert "jemalloc" not in capsys.readouterr().err  # turned off on purpose: nothing to say

    monkeypatch.setattr(flower_home, "JEMALLOC_PATHS", (str(tmp_path / "absent.so"),))
    env = flower_home.flower_environment(tmp_path / "home")
    assert "LD_PRELOAD" not in env
    assert "apt install libjemalloc2" in capsys.readouterr().err
    assert Path(env["FLWR_HOME"]) == tmp_path / "home"


def test_ray_address_joins_a_named_cluster_else_keeps_the_callers_else_starts_its_own(
        tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # "local": never the `ray start` cluster a bare ray.init() would find on this machine
    assert flower_home.flower_environment(tmp_path, False)["RAY_ADDRESS"] == "local"
    assert flower_home.flower_environment(tmp_path, False, "10.0.0.1:6379")[
        "RAY_ADDRESS"] == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert flower_home.flower_environment(tmp_path, False)["RAY_ADDRESS"] == "head:6379"
