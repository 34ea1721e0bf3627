"""The CLI skeleton: help, exit codes, recipes, backends, devices, runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_help_does_not_import_torch_or_backends():
    code = (
        "import sys\n"
        "from sundae_cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'h5py', 'sundae_vqgan', 'sundae_hourglass')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY []" in out
    assert "train" in out and "recipes" in out


def test_python_dash_m_runs_the_same_program():
    proc = subprocess.run(
        [sys.executable, "-m", "sundae_cli", "--version"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("sundae ")


def test_recipes_list_show_validate(cli, monkeypatch):
    monkeypatch.chdir(REPO)
    listed = cli("recipes", "list")
    assert listed.exit_code == 0
    names = {line.split("\t")[0] for line in listed.stdout.splitlines()}
    assert {"ffhq256", "ffhq1024", "tiny"} <= names

    shown = cli("recipes", "show", "ffhq256", "--set", "seed=7")
    assert shown.exit_code == 0
    assert "seed = 7" in shown.stdout and "codebook_size = 1024" in shown.stdout

    valid = cli("recipes", "validate", "recipes/tiny.toml")
    assert valid.exit_code == 0 and "ok" in valid.stdout


def test_recipes_from_env_and_config_dir(cli, tmp_path, monkeypatch):
    extra = tmp_path / "mine"
    extra.mkdir()
    (extra / "custom.toml").write_text('name = "custom"\nresolution = "cpu32"\n')
    monkeypatch.setenv("SUNDAE_RECIPES", str(extra))
    monkeypatch.chdir(tmp_path)
    listed = cli("recipes", "list")
    assert "custom\t" in listed.stdout
    assert cli("recipes", "validate", "custom").exit_code == 0


def test_bad_recipe_exits_2_with_one_line_per_problem(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\nresolution = "cpu32"\n[prior]\ndepht = 4\ndepth = 4.5\n'
        "[train.prior]\nlearning_rat = 3e-4\n"
    )
    result = cli("recipes", "validate", str(bad))
    assert result.exit_code == 2
    assert result.stdout == ""
    err = result.stderr
    assert "error:" in err and "3 problems" in err
    assert "prior.depht: unknown key (did you mean 'depth'?)" in err
    assert "train.prior.learning_rat" in err and "hint:" in err


def test_missing_recipe_and_syntax_error(cli, tmp_path):
    missing = cli("recipes", "show", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\nresolution = \n')
    result = cli("recipes", "validate", str(broken))
    assert result.exit_code == 2 and "line 2, column" in result.stderr


def test_unknown_backend_is_bad_input(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = cli("recipes", "validate", "tiny", "--set", "prior.backend=nope")
    assert result.exit_code == 2
    assert "unknown backend 'nope' (known: hourglass)" in result.stderr


def test_backends_list_shows_both_groups(cli):
    result = cli("backends", "list")
    assert result.exit_code == 0
    assert "vqgan" in result.stdout and "hourglass" in result.stdout
    assert "error" not in result.stdout


def test_devices_reports_auto(cli):
    result = cli("devices", "--json")
    info = json.loads(result.stdout)
    assert info["auto_device"] in ("cpu", "cuda", "mps")
    assert info["cpu_threads"] >= 1


def test_runs_list_empty_store_and_unknown_run(cli):
    listed = cli("runs", "list")
    assert listed.exit_code == 0 and listed.stdout == ""
    assert "no runs in" in listed.stderr
    shown = cli("runs", "show", "nope")
    assert shown.exit_code == 2 and "no run 'nope'" in shown.stderr


def test_unknown_flag_is_a_usage_error(cli):
    result = cli("recipes", "list", "--bogus")
    assert result.exit_code == 2


def test_out_that_is_a_file_is_bad_input_not_a_traceback(cli, tmp_path):
    from sundae_cli.errors import CheckpointError
    from sundae_cli.runs import create_run

    taken = tmp_path / "taken"
    taken.write_text("x")
    for args in (("data", "digits", taken), ("data", "photos", taken)):
        result = cli(*args)
        assert result.exit_code == 2, result.stderr
        assert f"error: {taken} is a file" in result.stderr
    with pytest.raises(CheckpointError, match="is a file"):
        create_run("prior", "tiny", {}, out=taken)  # train vqgan/prior --out FILE
    assert taken.read_text() == "x"


def test_unforeseen_os_error_is_one_error_line(cli, tmp_path, monkeypatch):
    import errno

    import sundae_cli.datasets

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "d"))

    monkeypatch.setattr(sundae_cli.datasets, "export_digits", refuse)
    result = cli("data", "digits", tmp_path / "d")
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'd'}: Permission denied" in result.stderr
    assert "Traceback" not in result.stderr
