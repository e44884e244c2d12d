"""Pushing a model with its card to the Hugging Face Hub.

A push uploads the final model folder only (weights, config, tokenizer or feature extractor or
open_clip config, the card) plus the run's resolved config and a metrics summary: never
checkpoints, optimizer states, TensorBoard events or caches. It goes through ``huggingface_hub``,
so the token comes from ``--token``, ``HF_TOKEN`` or the saved login, and ``HF_ENDPOINT`` is
respected. Failures become one-line ``HubError``s with the token scrubbed; transient ones
(connection errors, a connection lost mid-upload, 429, 5xx) are retried with back-off first. Local
files are never modified.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from multissl.card import retarget_card
from multissl.errors import ConfigError, HubError
from multissl.run_folder import find_model_folder

T = TypeVar("T")

# -------------------------------------------------------------------------------------------- config
@dataclass
class HubConfig:
    """Pushing the final model to the Hugging Face Hub at the end of training (``hub.*``, run by `multissl.callbacks.HubPushCallback`).

    A failed push is a warning, never a failed run: the model stays in ``output_dir/model`` and
    ``multissl push`` uploads it later. The token is never part of the config: it comes from
    ``HF_TOKEN`` or the saved login (``hf auth login``).
    """

    push: bool = False
    repo_id: str = ""
    """NAME or NAMESPACE/NAME; created when missing, else a new commit is added to it."""
    private: bool = False
    """Create the repo private (an existing repo keeps its visibility)."""
    revision: str = ""
    """A branch to push to (created from main when missing); empty = main."""
    commit_message: str = ""
    license: str = ""
    """License id for the card's metadata (e.g. apache-2.0, mit, cc-by-4.0); empty = not stated.
    Written on every run's local card too."""

    def __post_init__(self) -> None:
        if self.push and not self.repo_id.strip():
            raise ConfigError("hub.repo_id is required with hub.push=true (e.g. hub.repo_id=your-name/model)")
        if self.repo_id and (self.repo_id.count("/") > 1 or any(c.isspace() for c in self.repo_id)):
            raise ConfigError(f"hub.repo_id: expected NAME or NAMESPACE/NAME, got {self.repo_id!r}")


# ------------------------------------------------------------------------------------ what is pushed
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".md", ".jinja", ".tiktoken", ".png")
"""Weights (safetensors only), configs, vocabularies, tokenizer models, chat templates, the card."""
_NEVER_PUSHED = re.compile(
    r"(^|/)(checkpoints|tensorboard|runs|__pycache__|\.[^/]*)(/|$)"   # folders of training state, hidden files
    r"|(^|/)(optimizer|scheduler|rng_state|random_states|trainer_state|training_args)[^/]*$"
    r"|events\.out\.tfevents"
)
def model_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` a push uploads (sorted, relative to ``model_dir``)."""
    found = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir).as_posix()
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and not _NEVER_PUSHED.search(rel):
            found.append(Path(rel))
    return found


def metrics_summary(metrics_path: Path, train_points: int = 5) -> dict[str, Any]:
    """The last evaluation and a few evenly spaced training records of a run's ``metrics.jsonl``."""
    from multissl.metrics import read_jsonl

    rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    train = [r for r in rows if "train/loss" in r]
    picks = sorted({round(i * (len(train) - 1) / max(1, train_points - 1)) for i in range(train_points)}) if train else []
    keep = ("train/", "throughput/")
    return {
        "steps": max((r.get("step", 0) for r in rows), default=0),
        "final_eval": evals[-1] if evals else None,
        "train": [{k: v for k, v in train[i].items() if k == "step" or k.startswith(keep)} for i in picks],
    }


# ------------------------------------------------------------------------------------------ the push
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0)
"""Seconds to wait before the 2nd and 3rd tries of a call that failed transiently (connection, 429, 5xx)."""
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # a user access token's shape


@dataclass
class PushResult:
    repo_id: str
    url: str
    revision: str
    commit: str
    files: list[str] = field(default_factory=list)
    """Every path the commit covers (README.md, weights, ...)."""
    changed: bool = True
    """False when the repo already held exactly these files (no new commit was made)."""
    deleted: list[str] = field(default_factory=list)
    """Model files an earlier push left in the repo that this model no longer has (removed)."""


def scrub(text: str, token: str | None) -> str:
    """A message without the token (or anything shaped like a Hub token)."""
    if token:
        text = text.replace(token, "<token>")
    return _TOKEN_LIKE.sub("hf_***", text)


def _without_token(data: bytes, token: str) -> bytes:
    """A file's content with the token (only it: the rest is the user's) replaced."""
    return data.replace(token.encode(), b"<token>")


def hide_local_paths(text: str, run_dir: Path | None) -> str:
    """``text`` without this machine's layout: the run folder's absolute path becomes its name, the
    home folder ``~``. The card and the training config name paths (output_dir, data files,
    init_from) that say nothing to a reader on the Hub and can say too much about the uploader."""
    if run_dir is not None:
        resolved = run_dir.resolve()
        for form in {str(resolved), str(run_dir.absolute())}:
            text = text.replace(form, resolved.name)
    home = str(Path.home())
    return text.replace(home + "/", "~/") if len(home) > 1 else text


def _contents(model_dir: Path, run_dir: Path | None, repo_id: str, token: str) -> dict[str, Path | bytes]:
    """path in repo -> a local file, or bytes when the pushed file differs from the local one
    (the card retargeted to the repo and without local paths, anything the token had leaked into)."""
    out: dict[str, Path | bytes] = {}
    for rel in model_files(model_dir):
        local = model_dir / rel
        if rel.as_posix() == "README.md":
            card = hide_local_paths(retarget_card(local.read_text(encoding="utf-8"), repo_id), run_dir or model_dir)
            out["README.md"] = _without_token(card.encode(), token)
        elif local.suffix != ".safetensors" and token.encode() in (data := local.read_bytes()):
            out[rel.as_posix()] = _without_token(data, token)
        else:
            out[rel.as_posix()] = local
    if run_dir is not None:
        if (run_dir / "config.yaml").is_file():
            config = hide_local_paths((run_dir / "config.yaml").read_text(encoding="utf-8"), run_dir)
            out["training_config.yaml"] = _without_token(config.encode(), token)
        if (run_dir / "metrics.jsonl").is_file():
            summary = json.dumps(metrics_summary(run_dir / "metrics.jsonl"), indent=1, allow_nan=True) + "\n"
            out["metrics_summary.json"] = _without_token(summary.encode(), token)
    return out


STALE_FILES = re.compile(
    r"(^|/)([^/]+\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)|[^/]+\.safetensors\.index\.json"
    r"|(generation_|preprocessor_|tokenizer_|open_clip_)?config\.json|tokenizer\.json|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(txt|json)|merges\.txt|[^/]*sentencepiece[^/]*\.model|spiece\.model"
    r"|chat_template\.jinja|loss_curve\.png|training_config\.yaml|metrics_summary\.json)$")
"""Model artefacts (weights, configs, vocabularies, what multissl adds): one left in the repo by an
earlier push is removed when the new model lacks it, since loaders would pick it up beside the new
files. Anything else in the repo (.gitattributes, notes the owner added) is left alone."""


def _stale(repo_files: list[str], contents: dict[str, Any]) -> list[str]:
    return sorted(f for f in repo_files if f not in contents and STALE_FILES.search(f))


def push_to_hub(path: str | Path, repo_id: str, *, private: bool = False, revision: str = "", commit_message: str = "",
                token: str | None = None, exist_ok: bool = False, prune: bool = True) -> PushResult:
    """Upload a run's final model (``path`` = its output_dir, or the model folder) to ``repo_id``.

    Creates the repo (``exist_ok``: or adds a commit to an existing one) and the ``revision`` branch
    when missing. Unchanged files are not uploaded again; an unchanged folder makes no commit; with
    ``prune``, model files that an earlier push left and this model lacks are deleted in the same
    commit. Raises ``HubError`` with a one-line reason.
    """
    found = find_model_folder(path, HubError)
    model_dir, run_dir = found.model_dir, found.run_dir
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login`")
    api = HfApi(token=token)
    endpoint = api.endpoint
    stage = "create"
    try:
        repo = _with_retries(lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=exist_ok))
        full_id = repo.repo_id
        branch = revision or constants.DEFAULT_REVISION
        if branch != constants.DEFAULT_REVISION:
            stage = "branch"
            _with_retries(lambda: api.create_branch(full_id, branch=branch, exist_ok=True))
        stage = "commit"
        contents = _contents(model_dir, run_dir, full_id, token)
        head = _with_retries(lambda: api.repo_info(full_id, revision=branch)).sha
        operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in contents.items()]
        stale = _stale(_with_retries(lambda: api.list_repo_files(full_id, revision=branch)), contents) if prune else []
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        message = commit_message or f"Upload {model_dir.parent.name or 'model'} (multissl)"
        with _upload_bars_on_a_terminal_only():
            info = _with_retries(lambda: api.create_commit(full_id, operations, commit_message=message, revision=branch))
    except HubError:
        raise
    except Exception as err:
        reason = _describe(err, repo_id, endpoint, stage)
        if reason is None:
            raise
        raise HubError(scrub(reason, token)) from None
    return PushResult(repo_id=full_id, url=str(repo), revision=branch, commit=info.oid, files=sorted(contents),
                      changed=info.oid != head, deleted=stale)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it was raised from (the client wraps upload errors in RuntimeError)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def _is_client_closed(err: BaseException) -> bool:
    """httpx's error for a request on a closed client. huggingface_hub uploads LFS files from
    several threads through one shared client and closes it when a connection fails (to drop bad
    connections); another thread about to send on it then gets this. It means: the connection to
    the Hub broke (a server gone mid-upload), as transient as the error that closed it."""
    return isinstance(err, RuntimeError) and "client has been closed" in str(err)


def _is_network_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return (bool(names & {"TransportError", "ConnectionError", "TimeoutError"}) or isinstance(err, ConnectionError)
            or _is_client_closed(err))


def _uploading(err: BaseException) -> str:
    """`` while uploading FILE`` when the client says which upload failed, else nothing."""
    for e in _causes(err):
        found = re.match(r"Error while uploading '(.+)' to the Hub", str(e))
        if found:
            return f" while uploading {found.group(1)}"
    return ""


def _is_transient(err: BaseException) -> bool:
    for e in _causes(err):
        status = _status(e)
        if status is not None:
            return status == 429 or status >= 500
        if _is_network_error(e):
            return True
    return False


def _with_retries(call: Callable[[], T]) -> T:
    """``call()``, tried again after each of ``RETRY_DELAYS`` when it fails transiently. Each try
    after the first starts on a new HTTP client: the failed one may hold dead connections, or have
    been closed under one upload thread by another's connection error (see `_is_client_closed`)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except Exception as err:
            if delay is None or not _is_transient(err):
                raise
            time.sleep(delay)
            from huggingface_hub import close_session

            close_session()
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _upload_bars_on_a_terminal_only() -> Iterator[None]:
    """huggingface_hub's upload progress bars, only when stderr is a terminal: in a log or a pipe
    they are lines of noise, and a failed push must read as its one line."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not (getattr(sys.stderr, "isatty", None) and sys.stderr.isatty()) and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


def _one_line(text: Any, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: BaseException, repo_id: str, endpoint: str, stage: str) -> str | None:
    """A one-line reason for a failed push, or None for an error that is a bug, not a failure."""
    tries = f"(tried {len(RETRY_DELAYS) + 1} times)"
    for e in _causes(err):
        status = _status(e)
        if status is not None:
            server = _one_line(getattr(e, "server_message", None) or "")
            said = f": {server}" if server else ""
            if status == 401:
                return (f"the Hub at {endpoint} rejected the token (401){said}; check --token, HF_TOKEN or "
                        "`hf auth login`")
            if status == 403:
                return (f"no write access to {repo_id} (403){said}; push to your own namespace or an organization "
                        "you can write to")
            if status == 409 and stage == "create":
                return f"{repo_id} already exists (409); pass --exist-ok to add a commit to it"
            if status == 409:
                return f"conflict while pushing to {repo_id} (409){said}; another push may be under way: try again"
            if status == 404:
                return f"{repo_id} not found on {endpoint} (404){said}"
            if status == 429 or status >= 500:
                return f"the Hub at {endpoint} answered {status}{said} {tries}; try again later"
            return f"the Hub at {endpoint} answered {status}{said}"
        if type(e).__name__ == "OfflineModeIsEnabled":
            return "HF_HUB_OFFLINE is set: unset it to push"
        if _is_client_closed(e):
            return f"cannot reach the Hub at {endpoint}: the connection was lost{_uploading(err)} {tries}"
        if _is_network_error(e):
            return f"cannot reach the Hub at {endpoint}: {_one_line(e) or type(e).__name__}{_uploading(err)} {tries}"
    if isinstance(err, ValueError):  # the client's checks: invalid repo id, invalid card metadata, ...
        return _one_line(err)
    return None


def push_failure_warning(err: BaseException, hub: HubConfig, output_dir: Path) -> str:
    """The one line a training run prints when its push failed."""
    reason = str(err) if isinstance(err, HubError) else f"{type(err).__name__}: {err}"
    command = f"multissl push {output_dir} --repo-id {hub.repo_id}"
    command += " --exist-ok" + (" --private" if hub.private else "") + (f" --revision {hub.revision}" if hub.revision else "")
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # a broken token file must not hide the warning
        token = None
    return (f"warning: push to {hub.repo_id} failed: {scrub(_one_line(reason, 400), token)}; "
            f"the model is saved in {output_dir / 'model'}; run: {command}")
