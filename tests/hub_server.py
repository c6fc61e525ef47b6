"""A local, stateful stand-in for the Hugging Face Hub: Hub code is tested through the real client.

The Hub cannot be reached from the test machines, yet pushing and loading must go through
`huggingface_hub` and `transformers` themselves rather than mocks. `LocalHub` is a small threaded
HTTP server on 127.0.0.1 that speaks the subset of the Hub API those clients use:

- `GET /api/whoami-v2`, `POST /api/repos/create`, `DELETE /api/repos/delete`
- `GET /api/{type}s/{repo_id}[/revision/{rev}]` (repo_info, model_info, snapshot_download)
- `GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]` (list_repo_tree, list_repo_files)
- `GET /api/{type}s/{repo_id}/refs`, `POST /api/{type}s/{repo_id}/branch/{branch}`
- `POST /api/{type}s/{repo_id}/preupload/{rev}`: every file is "regular", so no LFS and no Xet
- `POST /api/{type}s/{repo_id}/commit/{rev}`: the NDJSON commit payload
- `POST /api/validate-yaml`: README metadata checks (what `ModelCard.validate` calls)
- `HEAD|GET /[{type}s/]{repo_id}/resolve/{rev}/{path}` with `ETag` and `X-Repo-Commit`

Repos, branches and commits live in memory. Errors carry the `X-Error-Code`/`X-Error-Message`
headers the client maps to `RepositoryNotFoundError`, `RevisionNotFoundError` and
`EntryNotFoundError`; an unknown token gets a 401 on every route, as on the real Hub.

Use it through the `hub` fixture: put `pytest_plugins = ["hub_server"]` in a test module.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

USER = "sae-tester"
ORG = "sae-lab"
TOKEN = "hf_local_test_write_token"
OTHER_USER = "someone-else"
OTHER_TOKEN = "hf_local_test_other_token"
REPO_TYPES = ("model", "dataset", "space")
_NAME_RE = re.compile(r"^(?!-)(?!.*(--|\.\.))[A-Za-z0-9_.-]{1,96}(?<![-.])$")
_TIMESTAMP = "2025-01-01T00:00:00.000Z"


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, message and error-code headers)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None,
        **body: Any,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data`: what the Hub reports as a regular file's `oid` and `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name or a full commit id points at."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class HubState:
    """Users, tokens and repos; every handler thread works on it under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = {TOKEN: (USER, [ORG]), OTHER_TOKEN: (OTHER_USER, [])}
        self.repos: dict[tuple[str, str], Repo] = {}
        self._commit_counter = itertools.count()

    def reset(self) -> None:
        with self.lock:
            self.repos.clear()

    def new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict) -> Commit:
        parent_oid = parent.oid if parent else None
        seed = f"{repo.repo_id}\n{parent_oid}\n{title}\n{next(self._commit_counter)}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent_oid, title, files)
        repo.commits[commit.oid] = commit
        return commit

    def namespaces(self, user: str | None) -> list[str]:
        if user is None:
            return []
        return [user] + next(orgs for name, orgs in self.users.values() if name == user)


class HubHandler(BaseHTTPRequestHandler):
    """Routes one request to the Hub operation it stands for."""

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing -------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.segments = [unquote(part) for part in url.path.strip("/").split("/")]
        body = self._read_body()
        try:
            with self.server.state.lock:
                self.user = self._authenticate()
                status, payload, headers = self._route(method, body)
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            status, payload = error.status, {"error": error.message, **error.body}
        except Exception as error:  # a bug in this server: answer it instead of dropping the line
            status, payload, headers = 500, {"error": repr(error)}, {"X-Error-Message": repr(error)}
        self._send(method, status, payload, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, bytes):
            content, content_type = payload, "application/octet-stream"
        else:
            content, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(content)

    def _authenticate(self) -> str | None:
        """The user behind the bearer token; None for anonymous calls; 401 for unknown tokens."""
        authorization = self.headers.get("Authorization")
        if authorization is None:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.server.state.users:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.server.state.users[token][0]

    def _route(self, method: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        segments = self.segments
        if segments[0] != "api":
            return self._resolve_file(method)
        route = (method, segments[1] if len(segments) > 1 else "")
        if route == ("GET", "whoami-v2"):
            return 200, self._whoami(), {}
        if route == ("POST", "validate-yaml"):
            return self._validate_yaml(json.loads(body))
        if route == ("POST", "repos") and segments[2:] == ["create"]:
            return 200, self._create_repo(json.loads(body)), {}
        if route == ("DELETE", "repos") and segments[2:] == ["delete"]:
            return 200, self._delete_repo(json.loads(body)), {}
        if len(segments) >= 4 and segments[1].removesuffix("s") in REPO_TYPES:
            return 200, self._repo_api(method, body), {}
        raise HubError(404, f"This test Hub does not implement {method} {self.path}")

    # -- account and repos ----------------------------------------------------------------------
    def _require_user(self) -> str:
        if self.user is None:
            raise HubError(401, "You must be authenticated to do this (pass a token).")
        return self.user

    def _whoami(self) -> dict:
        user = self._require_user()
        orgs = self.server.state.namespaces(user)[1:]
        return {
            "type": "user",
            "name": user,
            "fullname": user,
            "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "tests", "role": "write"}},
        }

    def _repo_key(self, payload: dict) -> tuple[str, str]:
        user = self._require_user()
        namespace, name = payload.get("organization") or user, payload["name"]
        if not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise HubError(400, f"Invalid repo name {namespace}/{name!s}: use letters, digits, -_.")
        if namespace not in self.server.state.namespaces(user):
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        return payload.get("type") or "model", f"{namespace}/{name}"

    def _create_repo(self, payload: dict) -> dict:
        repo_type, repo_id = self._repo_key(payload)
        state = self.server.state
        if (repo_type, repo_id) in state.repos:
            message = f"You already created this {repo_type} repo"
            raise HubError(409, message, url=self._repo_url(state.repos[(repo_type, repo_id)]))
        repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        gitattributes = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        initial = state.new_commit(repo, None, "initial commit", gitattributes)
        repo.branches["main"] = initial.oid
        state.repos[(repo_type, repo_id)] = repo
        return {"url": self._repo_url(repo), "name": repo_id, "id": repo_id}

    def _delete_repo(self, payload: dict) -> dict:
        repo_type, repo_id = self._repo_key(payload)
        if self.server.state.repos.pop((repo_type, repo_id), None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return {}

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.server.endpoint}/{prefix}{repo.repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        """The repo if this caller may see it (and write to it when `write`), else the Hub's 40x."""
        repo = self.server.state.repos.get((repo_type, repo_id))
        member = repo_id.split("/")[0] in self.server.state.namespaces(self.user)
        if repo is None or (repo.private and not member):
            status = 401 if self.user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write and not member:
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo

    # -- repo API ------------------------------------------------------------------------------
    def _repo_api(self, method: str, body: bytes) -> Any:
        repo_type = self.segments[1].removesuffix("s")
        repo_id, action, rest = "/".join(self.segments[2:4]), self.segments[4:5], self.segments[5:]
        write = method == "POST"
        repo = self._get_repo(repo_type, repo_id, write=write)
        match (method, action[0] if action else ""):
            case ("GET", ""):
                return self._repo_info(repo, repo.resolve("main"))
            case ("GET", "revision"):
                return self._repo_info(repo, repo.resolve(rest[0]))
            case ("GET", "tree"):
                return self._tree(repo.resolve(rest[0]), "/".join(rest[1:]))
            case ("GET", "refs"):
                return self._refs(repo)
            case ("POST", "preupload"):
                return self._preupload(repo, rest[0], json.loads(body))
            case ("POST", "commit"):
                return self._commit(repo, rest[0], body)
            case ("POST", "branch"):
                return self._create_branch(repo, rest[0], json.loads(body or b"{}"))
        raise HubError(404, f"This test Hub does not implement {method} {self.path}")

    def _repo_info(self, repo: Repo, commit: Commit) -> dict:
        card_data = _front_matter(commit.files.get("README.md", b"").decode())
        blobs = self.query.get("blobs") in ("1", "True", "true")
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_oid(data))
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "lastModified": _TIMESTAMP,
            "createdAt": _TIMESTAMP,
            "library_name": card_data.get("library_name"),
            "tags": list(card_data.get("tags") or []),
            "cardData": card_data or None,
            "siblings": siblings,
        }

    def _tree(self, commit: Commit, path: str) -> list[dict]:
        prefix = f"{path}/" if path else ""
        if path in commit.files or (prefix and not any(f.startswith(prefix) for f in commit.files)):
            raise HubError(404, f"{path} is not a folder in this revision", "EntryNotFound")
        recursive = self.query.get("recursive") in ("1", "True", "true")
        entries: dict[str, dict] = {}
        for file_path, data in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    oid = hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()
                    entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
            if recursive or len(parts) == 1:
                entries[file_path] = {
                    "type": "file",
                    "oid": git_blob_oid(data),
                    "size": len(data),
                    "path": file_path,
                }
        return list(entries.values())

    def _refs(self, repo: Repo) -> dict:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in repo.branches.items()
        ]
        return {"branches": branches, "tags": [], "converts": [], "pullRequests": []}

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> dict:
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = repo.resolve(payload.get("startingPoint") or "main").oid
        return {}

    def _branch_head(self, repo: Repo, branch: str) -> Commit:
        if "create_pr" in self.query:
            raise HubError(400, "This test Hub does not support pull requests (create_pr)")
        if branch not in repo.branches:
            raise HubError(404, f"Branch {branch} does not exist", "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    def _preupload(self, repo: Repo, branch: str, payload: dict) -> dict:
        head = self._branch_head(repo, branch)
        files = []
        for entry in payload["files"]:
            existing = head.files.get(entry["path"])
            files.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return {"files": files, "commitOid": head.oid}

    def _commit(self, repo: Repo, branch: str, body: bytes) -> dict:
        head = self._branch_head(repo, branch)
        files = dict(head.files)
        title = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value["summary"]
                if value.get("parentCommit") not in (None, head.oid):
                    raise HubError(412, f"parentCommit {value['parentCommit']} is not the head")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"This test Hub only accepts regular uploads, not {key!r}")
        commit = self.server.state.new_commit(repo, head, title, files)
        repo.branches[branch] = commit.oid
        return {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
            "commitMessage": title,
            "hookOutput": "",
            "pullRequestUrl": None,
        }

    # -- files and metadata ---------------------------------------------------------------------
    def _resolve_file(self, method: str) -> tuple[int, Any, dict[str, str]]:
        segments = self.segments
        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type, segments = segments[0].removesuffix("s"), segments[1:]
        if len(segments) < 5 or segments[2] != "resolve" or method not in ("GET", "HEAD"):
            raise HubError(404, f"This test Hub does not implement {method} {self.path}")
        repo = self._get_repo(repo_type, "/".join(segments[:2]))
        commit = repo.resolve(segments[3])
        path = "/".join(segments[4:])
        if path not in commit.files:
            message = f"{path} does not exist at {commit.oid}"
            raise HubError(404, message, "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": commit.oid}
        return 200, data, headers

    def _validate_yaml(self, payload: dict) -> tuple[int, Any, dict[str, str]]:
        """Check README metadata the way the Hub does for the fields hf_deepsae writes."""
        try:
            metadata = _front_matter(payload["content"])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"Invalid YAML: {error}"}]}, {}
        if not metadata:
            warning = {"message": "empty or missing yaml metadata"}
            return 200, {"errors": [], "warnings": [warning]}, {}
        errors = [{"message": message} for message in _metadata_errors(metadata)]
        return (400 if errors else 200), {"errors": errors, "warnings": []}, {}


def _front_matter(content: str) -> dict:
    """The YAML block between the leading `---` lines of a README, or {} when there is none."""
    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


def _metadata_errors(metadata: dict) -> list[str]:
    """The Hub's type checks on the model-card fields hf_deepsae uses."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    errors = []
    for key in ("library_name", "license", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "base_model"):
        value = metadata.get(key, [])
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            errors.append(f'"{key}" must be a string or a list of non-empty strings')
    if "model-index" in metadata:
        try:
            model_index_to_eval_results(metadata["model-index"])
        except (KeyError, TypeError, ValueError, IndexError) as error:
            errors.append(f'"model-index" is malformed: {error!r}')
    return errors


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    endpoint: str


class LocalHub:
    """A running local Hub: `endpoint`, `token`, `user`, `org`, and the in-memory `state`."""

    token, user, org = TOKEN, USER, ORG
    other_token, other_user = OTHER_TOKEN, OTHER_USER

    def __init__(self) -> None:
        self._server = _HubHTTPServer(("127.0.0.1", 0), HubHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._server.endpoint = self.endpoint
        self.state = self._server.state = HubState()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict:
        """Server-side view of a revision's files (path -> bytes), for assertions."""
        with self.state.lock:
            return dict(self.state.repos[(repo_type, repo_id)].resolve(revision).files)

    def point_clients_here(self, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
        """Send huggingface_hub and transformers to this server, logged in with `token`.

        The client reads `HF_ENDPOINT` once at import, so the module-level copies are patched too,
        and the caches (and token file) move to `home` so tests never see a real login.
        """
        from huggingface_hub import constants, hf_api

        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        monkeypatch.setenv("HF_TOKEN", self.token)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(home))
        template = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        for name, value in {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": template,
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        }.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)
        try:
            from transformers.utils import hub as transformers_hub
        except ImportError:
            return
        monkeypatch.setattr(transformers_hub, "_hf_api", None)


@pytest.fixture(scope="session")
def hub_server() -> Iterator[LocalHub]:
    with LocalHub() as server:
        yield server


@pytest.fixture
def hub(hub_server: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> LocalHub:
    """An empty local Hub that huggingface_hub and transformers talk to, logged in as `hub.user`."""
    hub_server.state.reset()
    hub_server.point_clients_here(monkeypatch, tmp_path / "hf-home")
    return hub_server
