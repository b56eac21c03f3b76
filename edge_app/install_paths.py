"""Where relative paths of an install are found: the feature model a config names, the default model."""
from __future__ import annotations

import sys
from pathlib import Path


def install_roots() -> list[Path]:
    """Where an install keeps its ``models/``: the checkout this package runs from (an editable install) and
    the folder holding the virtual environment (``/opt/musc-edge`` for ``/opt/musc-edge/.venv``)."""
    return [Path(__file__).resolve().parents[1], Path(sys.prefix).resolve().parent]


def resolve_model_path(path: str | Path, config_dir: str | Path | None = None) -> Path:
    """A relative model path as the first existing of: beside the config file (``config_dir``), under the
    install (:func:`install_roots`), under the working directory. Absolute paths, and a path found nowhere
    (its error then names it as written), are returned as they are."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    folders = ([Path(config_dir)] if config_dir is not None else []) + install_roots() + [Path.cwd()]
    for folder in folders:
        if (folder / path).exists():
            return (folder / path).absolute()
    return path
