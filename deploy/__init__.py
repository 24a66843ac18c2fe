"""The shipped configs as package data: this folder is installed as the import package
`distillgate_deploy` (see pyproject.toml), so the defaults are found the same way in a
checkout, an editable install and a wheel. Users read and copy the YAML files here."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped(name: str) -> Path:
    """The path of a shipped file, e.g. `shipped("sweeps/default.yaml")`.

    A real path, not a Traversable: configs name other files relative to themselves and
    the policy file is watched for changes. pip installs packages unzipped, so it is one.
    """
    resource = files(__name__).joinpath(*name.split("/"))
    if not isinstance(resource, Path):
        raise RuntimeError(f"distillgate_deploy is not installed as files: {resource}")
    return resource
