"""Named SAE releases: `load_sae("release", "sae_id")` without knowing repos or subfolders.

The registry is `releases.yaml` beside this file, plus the YAML file named by the
`HF_DEEPSAE_RELEASES` environment variable (a team's own releases; its entries win). Each release
names a Hub repo, an optional pinned revision, the checkpoint format (hf_deepsae's own, or sparsify
or SAELens, converted on load) and its SAE ids. Resolution reads only these files, so a release
already in the local Hub cache loads with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .files import FileFormatError

PACKAGED_REGISTRY = Path(__file__).with_name("releases.yaml")
REGISTRY_ENV = "HF_DEEPSAE_RELEASES"
FORMATS = ("hf_deepsae", "sparsify", "saelens")
_FIX = "fix the entry (the format is described at the top of hf_deepsae/releases.yaml)"


@dataclass(frozen=True)
class Release:
    """One named release: where its SAEs live and which ids it offers.

    `sae_ids` maps each id to its subfolder; empty means every subfolder of the repo is an id.
    """

    name: str
    repo_id: str
    format: str = "hf_deepsae"
    revision: str | None = None
    base_model: str | None = None
    description: str = ""
    sae_ids: dict[str, str] = field(default_factory=dict)

    def subfolder(self, sae_id: str | None) -> str | None:
        """The subfolder of `sae_id`; a clear error for an id the release doesn't list."""
        if not self.sae_ids:
            return sae_id
        if sae_id is None and len(self.sae_ids) == 1:
            return next(iter(self.sae_ids.values()))
        if sae_id not in self.sae_ids:
            raise ValueError(f"release {self.name!r} has no SAE {sae_id!r}; its ids are "
                             f"{sorted(self.sae_ids)} (list_releases() shows every release)")
        return self.sae_ids[sae_id]


def list_releases() -> dict[str, Release]:
    """Every registered release by name: the packaged registry, then `$HF_DEEPSAE_RELEASES`."""
    releases = _read_registry(PACKAGED_REGISTRY)
    extra = os.environ.get(REGISTRY_ENV)
    if extra:
        releases |= _read_registry(Path(extra))
    return releases


def find_release(name: str) -> Release | None:
    """The release called `name`, or None (names never contain "/", unlike repo ids)."""
    return None if "/" in name else list_releases().get(name)


def _read_registry(path: Path) -> dict[str, Release]:
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileFormatError(path, "the release registry does not exist",
                              f"point {REGISTRY_ENV} at an existing YAML file") from None
    except yaml.YAMLError as error:
        raise FileFormatError(path, f"not valid YAML ({error})", _FIX) from None
    if not isinstance(entries, dict):
        raise FileFormatError(path, "expected a mapping of release names to entries", _FIX)
    return {name: _release(path, name, entry) for name, entry in entries.items()}


def _release(path: Path, name: str, entry: object) -> Release:
    if not isinstance(entry, dict) or not isinstance(entry.get("repo_id"), str):
        raise FileFormatError(path, f"release {name!r} has no repo_id", _FIX)
    if "/" in str(name):
        raise FileFormatError(path, f"release name {name!r} contains '/', which is read as a "
                              f"repo id", _FIX)
    unknown = sorted(set(entry) - {"repo_id", "format", "revision", "base_model", "description",
                                   "sae_ids"})
    if unknown:
        raise FileFormatError(path, f"release {name!r} has unknown fields {unknown}", _FIX)
    release = Release(name=str(name), **{key: value for key, value in entry.items()
                                         if key != "sae_ids"},
                      sae_ids={str(key): str(value)
                               for key, value in (entry.get("sae_ids") or {}).items()})
    if release.format not in FORMATS:
        raise FileFormatError(path, f"release {name!r} has format {release.format!r}; use one "
                              f"of {list(FORMATS)}", _FIX)
    return release
