"""A Hub server that dies during the large-file (LFS) upload: ``multissl push`` fails in one line
after its retries, exits 2, and leaves the local files as they were.

The crash used to end in an 82-line traceback (``RuntimeError: Cannot send a request, as the
client has been closed``): huggingface_hub uploads LFS files from several threads through one
shared HTTP client and closes it when one thread's connection fails, under the others."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from multissl import hub
from multissl.errors import HubError
from tests.conftest import run
from tests.hub_server import HubServer
from tests.test_hub import TOKEN, client_env, point_client_at, snapshot

LFS_FILES = 5  # the weights and 4 figures: 5 upload threads, as huggingface_hub runs them

FAST_CLI = """
import sys, time, types
import huggingface_hub.utils._http as http
from multissl import hub
from multissl.cli import main
http.time = types.SimpleNamespace(sleep=lambda s: time.sleep(min(s, 0.01)))  # the client's own back-off, shortened
hub.RETRY_DELAYS = (0.05, 0.1)
sys.exit(main(sys.argv[1:]))
"""
"""``multissl push`` (the CLI's main) with the back-off delays cut, so a test waits ms, not 30 s."""


def a_run(root: Path) -> Path:
    """A run folder whose model has LFS files (binary): the weights and a few figures."""
    model = root / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "bert"}\n')
    (model / "model.safetensors").write_bytes(os.urandom(2 << 20))
    for i in range(LFS_FILES - 1):
        (model / f"figure_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n\0" + os.urandom(20_000))
    return root / "run"


def _lost_upload() -> RuntimeError:
    """What huggingface_hub raises when an upload thread sends on the client another thread closed:
    httpx's own error for a closed client, wrapped as the client wraps upload errors."""
    import httpx2

    client = httpx2.Client()
    client.close()
    try:
        try:
            client.get("http://127.0.0.1:9/")
        except RuntimeError as closed:
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from closed
    except RuntimeError as err:
        return err
    raise AssertionError("a closed client sent a request")


def test_a_server_dying_mid_upload_is_retried_then_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.utils._http as http

    run_dir = a_run(tmp_path)
    before = snapshot(run_dir)
    slept: list[float] = []
    monkeypatch.setattr(hub, "RETRY_DELAYS", (0.05, 0.1))
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=slept.append))
    monkeypatch.setattr(http, "time", SimpleNamespace(sleep=lambda seconds: None))  # the client's own back-off
    with HubServer(tokens={TOKEN: "alice"}) as server:
        url = server.url
        point_client_at(url, tmp_path / "hf_home", monkeypatch)
        server.die_during["lfs_upload"] = LFS_FILES
        with pytest.raises(HubError) as err:
            hub.push_to_hub(run_dir, "alice/crash")
    uploads = [status for _, route, status in server.requests if route == "lfs_upload"]
    # every upload was cut off mid-body; the client's own immediate retry can reach the server before it
    # has stopped listening, and is cut off too
    assert len(uploads) >= LFS_FILES and set(uploads) == {0}, uploads
    assert slept == [0.05, 0.1], "tried 3 times, as any transient failure"
    message = str(err.value)
    assert message.startswith(f"cannot reach the Hub at {url}: ") and message.endswith(" (tried 3 times)"), message
    assert "\n" not in message and TOKEN not in message
    assert set(server.files("alice/crash")) == set(), "nothing was committed"
    assert snapshot(run_dir) == before


def test_cli_push_to_a_server_dying_mid_upload_is_one_line_exit_2(tmp_path: Path) -> None:
    run_dir = a_run(tmp_path)
    before = snapshot(run_dir)
    with HubServer(tokens={TOKEN: "alice"}) as server:
        url = server.url
        server.die_during["lfs_upload"] = LFS_FILES
        proc = run([sys.executable, "-c", FAST_CLI, "push", str(run_dir), "--repo-id", "alice/crash", "--token", TOKEN],
                   timeout=120, **client_env(url, tmp_path / "hf_home", token=None))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"multissl: error: cannot reach the Hub at {url}: ") and "(tried 3 times)" in lines[0]
    assert TOKEN not in proc.stdout + proc.stderr
    assert server.count("lfs_upload") == LFS_FILES
    assert snapshot(run_dir) == before


def test_a_closed_client_is_a_lost_connection_retried_on_a_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import get_session

    lost = _lost_upload()
    assert hub._is_transient(lost)
    assert hub._describe(lost, "alice/x", "http://hub.test", "commit") == (
        "cannot reach the Hub at http://hub.test: the connection was lost while uploading model.safetensors "
        "(tried 3 times)")
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=lambda seconds: None))
    clients = []

    def commit() -> str:
        clients.append(get_session())
        if len(clients) == 1:
            raise _lost_upload()
        return "committed"

    assert hub._with_retries(commit) == "committed"
    assert clients[1] is not clients[0], "the retry runs on a new client"
    bug = RuntimeError("dictionary changed size during iteration")
    assert not hub._is_transient(bug) and hub._describe(bug, "alice/x", "http://hub.test", "commit") is None, \
        "other RuntimeErrors are bugs: not retried, not hidden"
