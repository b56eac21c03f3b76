"""`musc-edge`: bad input is one clean line and exit code 2; an internal bug keeps its traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from musc_edge.edge.cli import main
from musc_edge.edge.synthetic import generate_set

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate_set(tmp_path_factory.mktemp("cli") / "part", n=12, defect_fraction=0.25, seed=2, size=128)


@pytest.mark.parametrize("flags, message", [
    (["--blocks", "99"], "blocks [99] are not outputs of this model"),
    (["--size", "100"], "input size 100 is not a multiple of the patch size 14"),
    (["--mode", "stream", "--pool", "40", "--min-pool", "20"], "stream mode needs at least min_pool=20 images"),
])
def test_bad_input_is_one_line_and_exit_2(toy_model, small_set, capsys, flags, message):
    assert main(["eval", "--dataset", str(small_set), "--model", str(toy_model), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("musc-edge eval: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--pool", "1"), ("--min-pool", "0"), ("--image-top", "0"),
                                         ("--size", "-14")])
def test_impossible_numbers_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: expected a number >=" in capsys.readouterr().err


def test_a_synthetic_run_with_too_few_parts_is_a_usage_error(capsys):
    assert main(["run", "--parts", "1"]) == 2
    assert "a synthetic set needs at least 2 parts, got 1" in capsys.readouterr().err


def test_an_internal_value_error_ends_with_its_traceback(toy_model, small_set):
    # A bug inside the evaluation (here: a ValueError where none is expected) must not pass for bad input.
    script = ("import sys, musc_edge.edge.evaluation.runner as runner\n"
              "def broken(*args, **kwargs):\n"
              "    raise ValueError('an internal bug')\n"
              "runner.select_layers = broken\n"
              "from musc_edge.edge.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, "eval", "--dataset", str(small_set), "--model",
                           str(toy_model), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: an internal bug" in done.stderr
    assert "musc-edge eval: error" not in done.stderr
