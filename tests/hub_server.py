"""A local stand-in for the Hugging Face Hub's HTTP API, for tests (a helper module: not collected).

It speaks the routes the real ``huggingface_hub`` client uses to create a repo and a branch,
commit files (regular files inline in the NDJSON commit, LFS files through the batch API and a
basic-transfer PUT), validate a card's YAML, read repo info, list a tree and resolve files
(``hf_hub_download``, ``snapshot_download``, ``from_pretrained``, open_clip's ``hf-hub:``).

Repos live in memory: each commit is a full ``path -> Blob`` snapshot whose id is a hash of the
repo id and the contents. Authorization is ``Bearer <token>`` against ``tokens`` (token -> user):
a wrong token is a 401 everywhere; writes need a token whose user owns the namespace (or belongs
to it through ``orgs``), else 401 (anonymous) or 403; private repos answer 401 (anonymous) or 404
(another user) to reads. ``fail`` injects answers: ``server.fail["commit"] = [503]`` makes the
next commit call answer 503. ``die_during["lfs_upload"] = n`` crashes the server mid-upload: once n
uploads have sent part of their body, their connections are cut unanswered and the server stops
(logged with status 0). Every request is logged in ``requests`` as (method, route, status).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz", ".pkl", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
INVALID_TOKEN = "Invalid credentials in Authorization header"  # the client tells a bad token by this message


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        """What the Hub reports: sha256 for LFS files, the git blob sha1 for the others."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def new_commit(self, files: dict[str, Blob], message: str) -> str:
        listing = sorted((path, blob.etag) for path, blob in files.items())
        sha = hashlib.sha1(json.dumps([self.repo_id, listing]).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.messages.setdefault(sha, message)
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class HubServer:
    """``with HubServer(tokens={"hf_x": "alice"}) as hub: ... hub.url ...``"""

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, set[str]] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = dict(orgs or {})
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unknown: list[tuple[str, str]] = []
        self.validated: list[str] = []
        self.fail: dict[str, list[int]] = {}
        self.die_during: dict[str, int] = {}
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._dying: dict[str, threading.Barrier] = {}

    # ----------------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        with self.lock:  # a dying server stops from several handler threads at once
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ------------------------------------------------------------------- test helpers
    def add_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """A repo that exists before the test (e.g. under another user's name)."""
        with self.lock:
            repo = Repo(repo_id, private)
            blobs = {p: Blob(d, _is_lfs(p, len(d), d[:512])) for p, d in (files or {}).items()}
            repo.branches["main"] = repo.new_commit(blobs, "initial commit")
            self.repos[repo_id] = repo
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, f"{repo_id} has no revision {revision!r}"
        return {p: b.data for p, b in repo.commits[sha].items()}

    def count(self, route: str, method: str | None = None) -> int:
        return sum(1 for m, r, _ in self.requests if r == route and (method is None or m == method))

    # ------------------------------------------------------------------------- checks
    def user_for(self, authorization: str | None) -> str | None:
        """The user of the request's token; None for an anonymous request; a 401 for an unknown token."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        user = self.tokens.get(token)
        if user is None:
            raise HttpError(401, INVALID_TOKEN)
        return user

    def may_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, set()))

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.may_write(user, repo.namespace)):
            # the Hub does not tell a private repo from a missing one
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.readable(repo_id, user)
        if user is None:
            raise HttpError(401, "You must be authenticated to write to a repo")
        if not self.may_write(user, repo.namespace):
            raise HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def revision(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


def _tree_entry(path: str, blob: Blob | None) -> dict[str, Any]:
    if blob is None:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
    entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha(blob.data), "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.etag, "size": len(blob.data), "pointerSize": 134}
    return entry


def _folders(files: dict[str, Blob]) -> set[str]:
    out = set()
    for path in files:
        parts = path.split("/")[:-1]
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    data = yaml.safe_load(match.group(1))
    if data is not None and not isinstance(data, dict):
        raise ValueError("the metadata must be a mapping")
    return data or {}


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES: list[tuple[str, str, str]] = [  # (method, path pattern, handler); the route name is the handler's
    ("POST", r"/api/repos/create", "create"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("GET", rf"/api/models/{REPO}", "model_info"),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "model_info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("GET", rf"/api/models/{REPO}/refs", "refs"),
    ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "branch"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"  # a connection per request: a stopped server leaves no live connection behind

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    # ----------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        """The request body (read in full even when the answer is an error)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        if self.hub.die_during and self._dies(url.path):
            return
        body = self._body()
        route, status = "unknown", 500
        try:
            for method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and method == self.command:
                    route = name
                    break
            else:
                self.hub.unknown.append((self.command, self.path))
                raise HttpError(404, f"no route for {self.command} {url.path}")
            args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            with self.hub.lock:
                injected = self.hub.fail.get(route)
                if injected:
                    raise HttpError(injected.pop(0), f"injected failure of {route}")
                user = self.hub.user_for(self.headers.get("Authorization"))
                status, payload, headers = getattr(self, f"_{route}")(user, body, **args)
        except HttpError as err:
            status, headers = err.status, dict(err.headers)
            payload = err.body if err.body is not None else {"error": err.message}
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
        self.hub.requests.append((self.command, route, status))
        self._send(status, payload, headers)

    def _dies(self, path: str) -> bool:
        """``hub.die_during``: part of the body read, the others of the route awaited (up to 5 s),
        then the connection cut unanswered and the server stopped."""
        route = next((name for method, pattern, name in ROUTES if method == self.command and re.fullmatch(pattern, path)), "")
        if route not in self.hub.die_during:
            return False
        self.rfile.read(min(1024, int(self.headers.get("Content-Length") or 0)))
        with self.hub.lock:
            self.hub.requests.append((self.command, route, 0))
            barrier = self.hub._dying.setdefault(route, threading.Barrier(self.hub.die_during[route]))
        with contextlib.suppress(threading.BrokenBarrierError):  # fewer came: cut off those that did
            barrier.wait(timeout=5)
        self.connection.shutdown(socket.SHUT_RDWR)
        threading.Thread(target=self.hub.stop, daemon=True).start()
        return True

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, bytes):
            data, ctype = payload, "application/octet-stream"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        headers = {"Content-Type": ctype, "Content-Length": str(len(data)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # ------------------------------------------------------------------------- routes
    # each returns (status, JSON-able payload or bytes, extra headers)
    def _create(self, user: str | None, body: bytes) -> tuple[int, Any, dict[str, str]]:
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        req = json.loads(body or b"{}")
        namespace = req.get("organization") or user
        repo_id = f"{namespace}/{req['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if not self.hub.may_write(user, namespace):
            raise HttpError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        if repo_id in self.hub.repos:
            raise HttpError(409, "You already created this model repo", body={"error": "You already created this model repo",
                                                                                "url": url})
        self.hub.add_repo(repo_id, private=req.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, user: str | None, body: bytes) -> tuple[int, Any, dict[str, str]]:
        content = json.loads(body or b"{}").get("content", "")
        self.hub.validated.append(content)
        try:
            _front_matter(content)
        except (yaml.YAMLError, ValueError) as err:
            message = " ".join(str(err).split())
            raise HttpError(400, message, body={"errors": [{"message": message}]}) from None
        return 200, {"errors": [], "warnings": []}, {}

    def _whoami(self, user: str | None, body: bytes) -> tuple[int, Any, dict[str, str]]:
        if user is None:
            raise HttpError(401, "Invalid user token")
        orgs = [{"name": org} for org, members in self.hub.orgs.items() if user in members]
        return 200, {"type": "user", "name": user, "orgs": orgs,
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}, {}

    def _agent_harnesses(self, user: str | None, body: bytes) -> tuple[int, Any, dict[str, str]]:
        """The registry huggingface_hub reads to tag its user agent; empty here."""
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}

    def _model_info(self, user: str | None, body: bytes, repo: str, rev: str = "main") -> tuple[int, Any, dict[str, str]]:
        r = self.hub.readable(repo, user)
        sha = self.hub.revision(r, rev)
        files = r.commits[sha]
        card = _front_matter(files["README.md"].data.decode()) if "README.md" in files else {}
        info = {"id": repo, "modelId": repo, "author": r.namespace, "sha": sha, "private": r.private,
                "disabled": False, "gated": False, "tags": card.get("tags") or [], "cardData": card,
                "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
                "siblings": [{"rfilename": p} for p in sorted(files)]}
        return 200, info, {}

    def _tree(self, user: str | None, body: bytes, repo: str, rev: str, path: str = "") -> tuple[int, Any, dict[str, str]]:
        r = self.hub.readable(repo, user)
        sha = self.hub.revision(r, rev)
        files = r.commits[sha]
        folders = _folders(files)
        prefix = path.strip("/")
        if prefix and prefix not in folders:
            raise HttpError(404, f"{prefix} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        start = f"{prefix}/" if prefix else ""
        entries = []
        for p in sorted(set(files) | folders):
            rest = p[len(start):]
            if p.startswith(start) and rest and (recursive or "/" not in rest):
                entries.append(_tree_entry(p, files.get(p)))
        return 200, entries, {}

    def _refs(self, user: str | None, body: bytes, repo: str) -> tuple[int, Any, dict[str, str]]:
        r = self.hub.readable(repo, user)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(r.branches.items())]
        return 200, {"branches": branches, "tags": [], "converts": []}, {}

    def _paths_info(self, user: str | None, body: bytes, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self.hub.readable(repo, user)
        files = r.commits[self.hub.revision(r, rev)]
        folders = _folders(files)
        asked = parse_qs(body.decode()).get("paths", [])
        return 200, [_tree_entry(p, files.get(p)) for p in asked if p in files or p in folders], {}

    def _preupload(self, user: str | None, body: bytes, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self.hub.writable(repo, user)
        files = r.commits[self.hub.revision(r, rev)]
        out = []
        for f in json.loads(body)["files"]:
            lfs = _is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            old = files.get(f["path"])
            if old is not None and old.lfs == lfs:
                entry["oid"] = old.etag
            out.append(entry)
        return 200, {"files": out, "commitOid": r.branches.get(rev)}, {}

    def _lfs_batch(self, user: str | None, body: bytes, repo: str) -> tuple[int, Any, dict[str, str]]:
        self.hub.writable(repo, user)
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _lfs_upload(self, user: str | None, body: bytes, oid: str) -> tuple[int, Any, dict[str, str]]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HttpError(400, "the uploaded content does not match its sha256")
        self.hub.lfs_objects[oid] = body
        return 200, {}, {}

    def _commit(self, user: str | None, body: bytes, repo: str, rev: str) -> tuple[int, Any, dict[str, str]]:
        r = self.hub.writable(repo, user)
        if rev not in r.branches:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = dict(r.commits[r.branches[rev]])
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and parent != r.branches[rev]:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Blob(data, False)
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise HttpError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                raise HttpError(400, f"unknown commit operation {key!r}")
        sha = r.new_commit(files, header.get("summary", ""))
        r.branches[rev] = sha
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
                     "hookOutput": ""}, {}

    def _branch(self, user: str | None, body: bytes, repo: str, branch: str) -> tuple[int, Any, dict[str, str]]:
        r = self.hub.writable(repo, user)
        if branch in r.branches:
            raise HttpError(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        r.branches[branch] = self.hub.revision(r, start)
        return 200, {}, {}

    def _resolve(self, user: str | None, body: bytes, repo: str, rev: str, path: str) -> tuple[int, Any, dict[str, str]]:
        r = self.hub.readable(repo, user)
        sha = self.hub.revision(r, rev)
        blob = r.commits[sha].get(path)
        if blob is None:
            raise HttpError(404, f"{path} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(len(blob.data))})
        data = blob.data
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and self.command == "GET":
            first = int(ranged.group(1))
            last = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            return 206, data[first : last + 1], headers
        return 200, data, headers
