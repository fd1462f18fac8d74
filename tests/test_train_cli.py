"""train.py as users run it: bad configs print one line and exit 2."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_config_key_one_line_exit_2():
    p = _run("--config", "configs/tiny_gdpo.yaml", "advantage.estimater=grpo")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "config error: unknown config key 'advantage.estimater'; did you mean 'advantage.estimator'?"
    )
    assert "Traceback" not in p.stderr


def test_bad_value_and_missing_file():
    p = _run("--config", "configs/tiny_gdpo.yaml", "rollout.group_size=1")
    assert p.returncode == 2 and "rollout.group_size: 1 is out of range" in p.stderr
    p = _run("--config", "configs/nope.yaml")
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_check_and_help_config():
    p = _run("--config", "configs/math_gdpo.yaml", "--check")
    assert p.returncode == 0 and "config OK" in p.stdout
    p = _run("--help-config")
    assert p.returncode == 0 and "advantage.estimator" in p.stdout and "sample std" in p.stdout


def test_installed_gdpo_train_script(tmp_path):
    """The console script pyproject.toml declares (gdpo.cli:train_main) is installed and is train.py."""
    exe = Path(sys.executable).with_name("gdpo-train")
    assert exe.is_file(), "gdpo-train is not installed in this environment (pip install -e .)"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and "--help-config" in p.stdout and "key=value" in p.stdout
    p = subprocess.run([str(exe), "--config", str(ROOT / "configs/tiny_gdpo.yaml"), "--check"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and "config OK" in p.stdout, p.stderr
    p = subprocess.run([str(exe), "--config", str(ROOT / "configs/tiny_gdpo.yaml"), "advantage.estimater=grpo"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "did you mean 'advantage.estimator'" in p.stderr
