"""Share SAEs on the Hugging Face Hub: one call, safetensors weights and a card with real numbers.

`push_sae_to_hub(sae, "user/repo")` uploads the config (with `auto_map`, so
`AutoModel.from_pretrained(repo, trust_remote_code=True)` works even without hf_deepsae), the
safetensors weights, an optional feature-density plot and a README rendered from
`model_cards/sae.md`, all in one commit. `push_saes_to_hub({hookpoint: sae}, repo)` gives each SAE
its own subfolder, loadable with `AutoModel.from_pretrained(repo, subfolder=hookpoint)` or all at
once with `load_saes(repo)`, under a repo-level card (`model_cards/sae_collection.md`).
`save_sae`/`save_saes` write the same folders locally; `load_sae` takes one SAE from either layout.

A folder of SAEs also carries, at its top, the modeling code and a config.json listing the
subfolders (`sae_subfolders`): transformers fetches `auto_map` code from the top of a folder or repo
even when told a `subfolder`, and `from_pretrained` on the top then names the subfolders to load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi, get_token, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .configuration_deepsae import CONFIG_FIX, SUBFOLDERS_KEY, DeepSAEConfig, check_not_a_file
from .evaluation.plots import check_feature_density, plot_feature_density
from .files import FileFormatError, atomic_folders, atomic_write_json, read_json
from .interop import from_saelens, from_sparsify
from .model_card import DEFAULT_LICENSE, collection_card, sae_card
from .modeling_deepsae import DeepSAEModel
from .releases import Release, find_release

DENSITY_PLOT_FILENAME = "feature_density.png"
_STAGED_CARD = ".collection-README.md"

DensityPlot = torch.Tensor | str | Path


def save_sae(
    sae: DeepSAEModel,
    folder: str | Path,
    *,
    repo_id: str | None = None,
    subfolder: str | None = None,
    density_plot: DensityPlot | None = None,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """Write `sae` with its model card (and feature-density plot) to `folder`, ready to upload.

    The folder is written beside `folder` and swapped in whole, so a full disk or a crash leaves
    the previous content (or nothing), never new files next to old weights.

    Args:
        repo_id: where the folder will live on the Hub; the card's code uses it (else the path).
        subfolder: the folder's path inside that repo, for the card's loading code.
        density_plot: per-latent firing frequencies (`ActivationMetricsResult.feature_density`,
            rendered as a histogram) or a path to an image to copy.
        license: the card's license identifier.
    """
    folder = Path(folder)
    if density_plot is not None:
        _check_density_plot(density_plot)
    with atomic_folders(folder) as (scratch,):
        _write_sae(sae, scratch, repo_id=repo_id or str(folder), subfolder=subfolder,
                   density_plot=density_plot, license=license)
    return folder


def _write_sae(sae: DeepSAEModel, folder: Path, *, repo_id: str, subfolder: str | None,
               density_plot: DensityPlot | None, license: str) -> None:
    sae.save_pretrained(folder)
    plot_name = None
    if density_plot is not None:
        _write_density_plot(density_plot, folder / DENSITY_PLOT_FILENAME)
        plot_name = DENSITY_PLOT_FILENAME
    card = sae_card(sae, repo_id=repo_id, subfolder=subfolder, density_plot=plot_name,
                    license=license)
    card.save(folder / "README.md")


def save_saes(
    saes: Mapping[str, DeepSAEModel],
    folder: str | Path,
    *,
    repo_id: str | None = None,
    density_plots: Mapping[str, DensityPlot] | None = None,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """Write SAEs trained together into one folder: a subfolder per hookpoint and a repo card.

    `saes` maps each subfolder name (the hookpoint, e.g. `"model.layers.6.mlp.down_proj"`) to its
    SAE; `density_plots` optionally maps the same names to what `save_sae` accepts. All subfolders
    and the card are written beside their places first and swapped in together: a full disk or a
    crash leaves every SAE as it was.
    """
    folder = Path(folder)
    _check_subfolders(saes)
    density_plots = density_plots or {}
    for name, density_plot in density_plots.items():
        if name not in saes:
            raise ValueError(f"density_plots[{name!r}] names no SAE; use the keys of saes "
                             f"{sorted(saes)}")
        _check_density_plot(density_plot)
    card = collection_card(saes, repo_id=repo_id or str(folder), license=license)
    with atomic_folders(*(folder / name for name in saes)) as scratches:
        for (name, sae), scratch in zip(saes.items(), scratches, strict=True):
            _write_sae(sae, scratch, repo_id=repo_id or str(folder), subfolder=name,
                       density_plot=density_plots.get(name), license=license)
        card.save(scratches[0] / _STAGED_CARD)
    os.replace(folder / next(iter(saes)) / _STAGED_CARD, folder / "README.md")
    _write_folder_config(folder, list(saes))
    return folder


def push_sae_to_hub(
    sae: DeepSAEModel,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    density_plot: DensityPlot | None = None,
    license: str = DEFAULT_LICENSE,
) -> CommitInfo:
    """Push one SAE with its model card to `repo_id` (created if needed) in a single commit.

    Args:
        revision: branch to push to; created from `main` if it doesn't exist.
        private: visibility of a newly created repo (an existing repo keeps its visibility).
        token: a Hub token with write access; defaults to the logged-in one (`hf auth login`).
        density_plot, license: see `save_sae`.
    """
    api, repo_id = _prepare_repo(repo_id, revision=revision, private=private, token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_sae(sae, folder, repo_id=repo_id, density_plot=density_plot, license=license)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision,
            commit_message=commit_message or f"Upload {sae.config.architecture} SAE",
        )


def push_saes_to_hub(
    saes: Mapping[str, DeepSAEModel],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    density_plots: Mapping[str, DensityPlot] | None = None,
    license: str = DEFAULT_LICENSE,
) -> CommitInfo:
    """Push SAEs trained together to one repo in a single commit: a subfolder per hookpoint.

    Each SAE loads with `AutoModel.from_pretrained(repo_id, subfolder=hookpoint)`; `load_saes`
    loads them all. Arguments as in `push_sae_to_hub` and `save_saes`.
    """
    _check_subfolders(saes)
    api, repo_id = _prepare_repo(repo_id, revision=revision, private=private, token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_saes(saes, folder, repo_id=repo_id, density_plots=density_plots, license=license)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision,
            commit_message=commit_message or f"Upload {len(saes)} SAEs",
        )


def sae_subfolders(path_or_repo: str | Path, *, revision: str | None = None,
                   token: str | None = None) -> list[str] | None:
    """The subfolders of a folder or Hub repo holding one SAE per hookpoint; None for one SAE.

    Read from the top-level config.json `save_saes` writes; folders written before it had one
    are recognised by their `<subfolder>/config.json` files ([] when there are none).
    """
    _refuse_missing_folder(path_or_repo)
    local = Path(path_or_repo)
    if local.is_dir():
        top = local / "config.json"
        if top.is_file():
            return read_json(top, fix=CONFIG_FIX).get(SUBFOLDERS_KEY)
        return sorted(path.parent.name for path in local.glob("*/config.json"))
    try:
        top = hf_hub_download(str(path_or_repo), "config.json", revision=revision, token=token)
    except EntryNotFoundError as error:
        if isinstance(error, LocalEntryNotFoundError):  # offline, or the Hub is unreachable
            raise
        files = HfApi(token=token).list_repo_files(str(path_or_repo), revision=revision)
        return sorted({file.split("/")[0] for file in files
                       if file.count("/") == 1 and file.endswith("/config.json")})
    return read_json(top, fix="re-push the SAE(s)").get(SUBFOLDERS_KEY)


def load_saes(
    path_or_repo: str | Path, *, revision: str | None = None, token: str | None = None
) -> dict[str, DeepSAEModel]:
    """Every SAE in a folder or repo written by `save_saes`/`push_saes_to_hub`: `{subfolder: sae}`.

    The keys are the hookpoints the SAEs were saved under, so the result goes straight to
    `splice(model, load_saes(repo))`.
    """
    names = sae_subfolders(path_or_repo, revision=revision, token=token)
    if not names:
        raise ValueError(
            f"{path_or_repo} has no SAE subfolders (no '<hookpoint>/config.json'); for a single "
            f"SAE use AutoModel.from_pretrained({str(path_or_repo)!r})"
        )
    return {name: load_sae(path_or_repo, name, revision=revision, token=token) for name in names}


def load_sae(path_or_repo: str | Path, subfolder: str | None = None, *,
             revision: str | None = None, token: str | None = None) -> DeepSAEModel:
    """One SAE from a folder, a Hub repo of either layout, or a named release.

    `subfolder` picks from a collection (`save_saes`, `push_saes_to_hub`, the trainer's output);
    a collection of one needs none. For a release registered in `releases.yaml`
    (`list_releases()`), `load_sae(release, sae_id)` resolves the repo, subfolder, revision and
    format (sparsify and SAELens releases are converted). A missing path that can't be a repo id
    fails at once.
    """
    release = None if Path(path_or_repo).exists() else find_release(str(path_or_repo))
    if release is not None:
        return _load_release(release, subfolder, revision=revision, token=token)
    _refuse_missing_folder(path_or_repo)
    if subfolder is None:
        names = sae_subfolders(path_or_repo, revision=revision, token=token)
        if names == []:
            raise ValueError(f"{path_or_repo} holds no SAE: no config.json in it or its subfolders")
        if names is not None and len(names) > 1:
            raise ValueError(f"{path_or_repo} holds {len(names)} SAEs {names}, one per hookpoint; "
                             f"pick one with subfolder= (--subfolder)")
        subfolder = names[0] if names else None
    return DeepSAEModel.from_pretrained(str(path_or_repo), subfolder=subfolder or "",
                                        revision=revision, token=token)


def _load_release(release: Release, sae_id: str | None, *, revision: str | None,
                  token: str | None) -> DeepSAEModel:
    """The SAE `sae_id` of `release`, converted from its format; `revision` overrides the pin."""
    subfolder, revision = release.subfolder(sae_id), revision or release.revision
    if release.format == "sparsify":
        return from_sparsify(release.repo_id, subfolder, revision=revision, token=token)
    if release.format == "saelens":
        return from_saelens(release.repo_id, subfolder, revision=revision, token=token)
    return DeepSAEModel.from_pretrained(release.repo_id, subfolder=subfolder or "",
                                        revision=revision, token=token)


def _refuse_missing_folder(path_or_repo: str | Path) -> None:
    """Fail at once on a missing folder that can't be a Hub repo, or is the trainer's default
    output (asking the Hub for it would only fail, after half a minute of retries offline)."""
    name = str(path_or_repo)
    check_not_a_file(name)
    if Path(name).exists():
        return
    from .training.config import TrainingConfig  # here: hf_deepsae.training imports this module

    if name == TrainingConfig.output_dir:
        raise ValueError(f"no SAE folder at {name!r}: train one with `accelerate launch "
                         f"examples/train.py` (it saves there), or pass an SAE folder or Hub id")
    if not _could_be_repo_id(name):
        raise ValueError(f"no SAE folder at {name!r} (and it is not a Hub repo id); pass an SAE "
                         f"folder or a Hub repo id")


def _could_be_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _write_folder_config(folder: Path, names: list[str]) -> None:
    """The top of a folder of SAEs: their modeling code and a config.json listing them.

    transformers resolves `auto_map` code at the top of a folder or repo even when loading from a
    subfolder, so `AutoModel.from_pretrained(folder, subfolder=..., trust_remote_code=True)` needs
    the code there; the config.json (`SUBFOLDERS_KEY`) turns `from_pretrained(folder)` into an
    error naming the subfolders, with or without hf_deepsae installed.
    """
    first = folder / names[0]
    for code in first.glob("*.py"):
        shutil.copyfile(code, folder / code.name)
    auto_map = read_json(first / "config.json", fix="re-save the SAEs")["auto_map"]
    atomic_write_json(folder / "config.json", {
        "model_type": DeepSAEConfig.model_type, "auto_map": auto_map, SUBFOLDERS_KEY: names})


def _check_subfolders(saes: Mapping[str, DeepSAEModel]) -> None:
    """Subfolder names must be single, non-empty path segments the Hub accepts."""
    if not saes:
        raise ValueError("saes is empty; pass {hookpoint: sae} with at least one SAE")
    for name, sae in saes.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
                or "\\" in name or name.startswith(".") or name == "README.md":
            raise ValueError(
                f"invalid subfolder name {name!r}: use the hookpoint (a module path such as "
                f"'model.layers.6.mlp.down_proj'), one folder name without slashes"
            )
        if not isinstance(sae, DeepSAEModel):
            raise TypeError(f"saes[{name!r}] must be a DeepSAEModel, got {type(sae).__name__}")


def _prepare_repo(
    repo_id: str, *, revision: str | None, private: bool | None, token: str | None
) -> tuple[HfApi, str]:
    """Check the id and the login up front, then create the repo (and branch) if needed.

    Returns a client bound to the token and the full `namespace/name` id. Failing early with the
    fix in the message beats the Hub's bare 401/403 halfway through an upload.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r}: {error} Use 'name' or 'namespace/name' made of "
            f"letters, digits, '-', '_' and '.', e.g. 'my-user/deepsae-smollm2-layer6'"
        ) from None
    token = token or get_token()
    if token is None:
        raise PermissionError(
            "not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN, or "
            "pass token=...) with a token that has write access, then push again"
        )
    api = HfApi(token=token)
    try:
        account = api.whoami()
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 401:
            raise
        raise PermissionError(
            f"the Hub at {api.endpoint} rejected the token (401): it is invalid or expired. Create "
            f"a write token at https://huggingface.co/settings/tokens, then run "
            f"`hf auth login --force` (or set HF_TOKEN, or pass token=...)"
        ) from None
    writable = [account["name"]] + [org["name"] for org in account.get("orgs", [])]
    namespace = repo_id.split("/")[0] if "/" in repo_id else account["name"]
    if namespace not in writable:
        raise PermissionError(
            f"{account['name']!r} cannot create repos under {namespace!r}; push to one of your "
            f"namespaces {writable}, e.g. '{writable[0]}/{repo_id.split('/')[-1]}'"
        )
    full_id = api.create_repo(f"{namespace}/{repo_id.split('/')[-1]}", private=private,
                              exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(full_id, branch=revision, exist_ok=True)
    return api, full_id


def _write_density_plot(density_plot: DensityPlot, path: Path) -> None:
    """Copy an image, or draw the histogram of per-latent firing frequencies."""
    if isinstance(density_plot, torch.Tensor):
        plot_feature_density(density_plot, path)
    else:
        shutil.copyfile(density_plot, path)


def _check_density_plot(density_plot: DensityPlot) -> None:
    """Before anything is written: densities to draw, or an image that exists."""
    if isinstance(density_plot, torch.Tensor):
        check_feature_density(density_plot)
    elif not Path(density_plot).is_file():
        raise FileFormatError(density_plot, "the density plot to copy does not exist",
                              "pass an existing image, or the feature densities as a tensor")
