"""The install the README prints stays light; CI still installs what every test needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PEERS = {"eai-sparsify", "sae-lens", "transformer-lens"}
"""The libraries the interop tests load checkpoints with (their light dependencies come too)."""


def extras() -> dict[str, set[str]]:
    """`{extra: {distribution name}}` from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {extra: {re.split(r"[<>=!~\[ ;]", requirement)[0] for requirement in requirements}
            for extra, requirements in project["optional-dependencies"].items()}


def test_the_peer_libraries_have_their_own_extra():
    assert extras()["peers"] >= PEERS
    assert not extras()["dev"] & extras()["peers"]


def test_the_readme_installs_the_light_extras_and_ci_the_peers_too():
    readme = (REPO / "README.md").read_text()
    (install,) = re.findall(r'pip install -e "\.\[([a-z,]+)\]"', readme)
    assert {"dev", "examples"} <= set(install.split(",")) and "peers" not in install
    assert 'pip install --quiet -e ".[dev,examples,peers]"' in (REPO / ".ci" / "run").read_text()
