"""Shared fixtures: model files, real data locations, synthetic parts."""
from __future__ import annotations

from pathlib import Path

import pytest

from musc_edge.edge.synthetic import generate_set

from .toymodel import build_toy_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEFAULT_MODEL = ROOT / "models" / "dinov2_vits14_musc.onnx"


def pytest_configure(config) -> None:
    """Tests stop the commands they start with Ctrl-C (SIGINT), as an operator would. A suite started as a
    background job (``make test &``, ``nohup``) inherits SIGINT ignored, and so would every command it starts:
    Python then installs no KeyboardInterrupt handler and the command never stops. Give SIGINT back its handler;
    the commands started from here get the default disposition again."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config) -> str:
    """The CPU the suite ran on: the features that choose ONNX Runtime's INT8 and fp32 kernels."""
    from musc_edge.edge.cpu_features import cpu_features

    return f"cpu: {cpu_features().summary()}"


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy") / "toy.onnx")


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"default feature model not built ({DEFAULT_MODEL}); run `make setup`")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def bottle() -> Path:
    path = SHARED_DATA / "mvtec_ad" / "bottle"
    if not path.is_dir():
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture(scope="session")
def tire() -> Path:
    path = SHARED_DATA / "mvtec_3d_ad" / "tire"
    if not path.is_dir():
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture(scope="session")
def synthetic_parts(tmp_path_factory) -> Path:
    """48 seeded synthetic parts (a quarter defective) in MVTec AD layout."""
    return generate_set(tmp_path_factory.mktemp("synthetic") / "part", n=48, defect_fraction=0.25, seed=3)
