"""Pushing to the Hub, end to end against a local server that speaks the Hub's HTTP API
(``tests/hub_server.py``), with the real ``huggingface_hub`` client and the libraries a user loads
the model with (transformers, open_clip)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from multissl import card as card_lib
from multissl import hub
from multissl.errors import HubError
from multissl.run_folder import ModelFolder, find_model_folder
from tests.conftest import BIN, run, tiny_args
from tests.hub_server import HubServer

TOKEN = "hf_AliceWriteToken0123456789abcdef"
BOB_TOKEN = "hf_BobWriteToken0123456789abcdefgh"


def client_env(url: str, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "0"}
    if token:
        env["HF_TOKEN"] = token
    return env


def point_client_at(url: str, home: Path, monkeypatch: pytest.MonkeyPatch, token: str | None = TOKEN) -> None:
    """This process's huggingface_hub (and transformers' shared client) talks to ``url``. Some of its
    settings are read from the environment at import time, so the constants are patched as well."""
    import huggingface_hub.hf_api
    import transformers.utils.hub
    from huggingface_hub import constants

    for key, value in client_env(url, home, token).items():
        monkeypatch.setenv(key, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in {
        "ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)  # the module-level functions' client
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # rebuilt on first use, with the new endpoint


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with HubServer(tokens={TOKEN: "alice", BOB_TOKEN: "bob"}) as s:
        point_client_at(s.url, tmp_path / "hf_home", monkeypatch)
        monkeypatch.setattr(hub, "RETRY_DELAYS", (0.05, 0.1))
        yield s
    assert not s.unknown, f"the client used routes the test server does not speak: {s.unknown}"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def usage_snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("\n```", 1)[0]


# ------------------------------------------------------------------------- trained outputs (2 steps)
@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from multissl_recipes import mlm

    out = tmp_path_factory.mktemp("mlm") / "run"
    mlm.main(tiny_args(out, steps=2, **{"trainer.log_every": 1, "trainer.eval_max_batches": 1,
                                        "hub.license": "apache-2.0"}))
    return out


@pytest.fixture(scope="module")
def wav2vec2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from multissl_recipes import wav2vec2

    from multissl.data.speech_demo import build_speech_corpus

    root = tmp_path_factory.mktemp("wav2vec2")
    manifest = build_speech_corpus(root / "speech", 16, seed=0)
    wav2vec2.main([f"trainer.output_dir={root / 'run'}", f"data.manifest={manifest}", "trainer.max_steps=2",
                   "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.log_every=1", "trainer.eval_every=0",
                   "trainer.eval_max_batches=1", "data.max_seconds=3.0", "data.max_batch_samples=100000",
                   "loss.num_negatives=10", "trainer.warmup_steps=1", "data.validation_fraction=0.25"])
    return root / "run"


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from multissl_recipes import clip

    out = tmp_path_factory.mktemp("clip") / "run"
    clip.main([f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.trackers=[]",
               "trainer.log_every=1", "trainer.eval_every=0", "trainer.batch_size=16", "trainer.eval_max_batches=1",
               "eval.max_images=32"])
    return out


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from multissl_recipes import simclr

    out = tmp_path_factory.mktemp("simclr") / "run"
    simclr.main([f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.trackers=[]",
                 "trainer.log_every=1", "trainer.eval_every=0", "trainer.batch_size=16", "trainer.eval_max_batches=1",
                 "probe.task=\"\"", "augment.size=16"])
    return out


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from multissl_recipes import mae

    out = tmp_path_factory.mktemp("mae") / "run"
    mae.main([f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.trackers=[]",
              "trainer.log_every=1", "trainer.eval_every=0", "trainer.batch_size=16", "trainer.eval_max_batches=1",
              "probe.task=\"\"", "augment.size=16",
              "model.config={patch_size: 4, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
              "intermediate_size: 64, decoder_hidden_size: 32, decoder_num_hidden_layers: 1, "
              "decoder_num_attention_heads: 2, decoder_intermediate_size: 64}"])
    return out


# ------------------------------------------------------------------------ each recipe, pushed and loaded
def test_an_image_ssl_backbone_push_loads_back_with_timm(server: HubServer, simclr_run: Path) -> None:
    import timm
    from huggingface_hub import ModelCard
    from PIL import Image

    hub.push_to_hub(simclr_run, "alice/tiny-simclr")
    assert {"config.json", "model.safetensors", "README.md"} <= set(server.files("alice/tiny-simclr"))
    model = timm.create_model("hf-hub:alice/tiny-simclr", pretrained=True).eval()
    local = timm.create_model(f"local-dir:{simclr_run / 'model'}", pretrained=True).eval()
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), local(x), rtol=0, atol=0)
    card = ModelCard.load("alice/tiny-simclr")
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-feature-extraction"
    snippet = usage_snippet(card.text)
    assert '"hf-hub:alice/tiny-simclr"' in snippet and "local-dir:" not in snippet
    scope = {"pil_image": Image.new("RGB", (40, 30), (10, 200, 30))}
    exec(snippet, scope)
    assert scope["features"].shape == (1, model.num_features)


def test_an_mae_push_loads_back_with_transformers_and_shows_its_reconstructions(
        server: HubServer, mae_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    hub.push_to_hub(mae_run, "alice/tiny-mae")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "reconstructions.png",
            "README.md"} <= set(server.files("alice/tiny-mae"))
    model = AutoModel.from_pretrained("alice/tiny-mae").eval()
    local = AutoModel.from_pretrained(mae_run / "model").eval()
    processor = AutoImageProcessor.from_pretrained("alice/tiny-mae")
    inputs = processor(images=Image.new("RGB", (40, 30), (10, 200, 30)), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, local(**inputs).last_hidden_state, rtol=0, atol=0)
    card = ModelCard.load("alice/tiny-mae")
    assert card.data.library_name == "transformers" and "](reconstructions.png)" in card.text
    snippet = usage_snippet(card.text)
    assert '"alice/tiny-mae"' in snippet
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), (10, 200, 30)).save("image.png")
    scope: dict[str, object] = {}
    exec(snippet, scope)
    assert scope["features"].shape == (1, model.config.hidden_size)


def test_mlm_push_loads_back_with_transformers(server: HubServer, mlm_run: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    before = snapshot(mlm_run)
    result = hub.push_to_hub(mlm_run, "alice/tiny-bert")
    assert snapshot(mlm_run) == before, "the local output is never touched"
    assert (result.repo_id, result.revision, result.changed) == ("alice/tiny-bert", "main", True)

    pushed = server.files("alice/tiny-bert")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "training_config.yaml",
            "metrics_summary.json"} <= set(pushed)
    assert not [p for p in pushed if p.startswith(("checkpoints", "tensorboard")) or "optimizer" in p or "tfevents" in p]
    assert pushed["model.safetensors"] == (mlm_run / "model" / "model.safetensors").read_bytes()
    # the config as trained, minus this machine's paths (the run folder's location becomes its name)
    local_config = (mlm_run / "config.yaml").read_text()
    assert str(mlm_run.parent) in local_config
    assert pushed["training_config.yaml"].decode() == local_config.replace(str(mlm_run.resolve()), "run")
    assert str(mlm_run.parent) not in pushed["README.md"].decode()
    assert pushed["loss_curve.png"].startswith(b"\x89PNG") and "](loss_curve.png)" in pushed["README.md"].decode()
    summary = json.loads(pushed["metrics_summary.json"])
    assert summary["steps"] == 2 and "eval/loss" in summary["final_eval"] and [r["step"] for r in summary["train"]] == [1, 2]
    assert server.count("lfs_upload") == 2, "the binary files (weights, loss curve) go through LFS"

    local = mlm_run / "model"
    tokenizer = AutoTokenizer.from_pretrained("alice/tiny-bert")
    model = AutoModelForMaskedLM.from_pretrained("alice/tiny-bert").eval()
    reference = AutoModelForMaskedLM.from_pretrained(local).eval()
    text = f"The return statement {tokenizer.mask_token} an exception."
    inputs = tokenizer(text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == AutoTokenizer.from_pretrained(local)(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)

    card = ModelCard.load("alice/tiny-bert")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "fill-mask"
    assert "self-supervised" in card.data.tags and card.data.license == "apache-2.0"
    # model-index: the held-out headline metrics, as logged at the end of training
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert set(results) == {"loss", "perplexity", "masked_accuracy"}
    assert results["loss"] == pytest.approx(summary["final_eval"]["eval/loss"], abs=1e-4)
    assert server.validated and server.validated[-1] == pushed["README.md"].decode(), "the client validated the card"
    snippet = usage_snippet(card.text)
    assert 'model="alice/tiny-bert"' in snippet and str(local) not in snippet
    assert str(local) in usage_snippet((local / "README.md").read_text()), "the local card still loads locally"
    exec(snippet, {})  # the pushed card's snippet runs as written, against the (local) Hub


def test_wav2vec2_push_loads_back_with_transformers(server: HubServer, wav2vec2_run: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    hub.push_to_hub(wav2vec2_run / "model", "alice/tiny-wav2vec2")  # the model folder itself works too
    assert {"preprocessor_config.json", "training_config.yaml", "metrics_summary.json"} <= set(server.files("alice/tiny-wav2vec2"))
    model = Wav2Vec2Model.from_pretrained("alice/tiny-wav2vec2").eval()
    reference = Wav2Vec2Model.from_pretrained(wav2vec2_run / "model").eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained("alice/tiny-wav2vec2")
    waveform = torch.sin(torch.arange(16000) / 7.0).numpy()
    inputs = extractor(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state, rtol=0, atol=0)
    card = ModelCard.load("alice/tiny-wav2vec2")
    assert card.data.library_name == "transformers" and "self-supervised" in card.data.tags
    scope = {"waveform_16khz": waveform}
    exec(usage_snippet(card.text), scope)
    assert scope["hidden"].shape[-1] == model.config.hidden_size


def test_clip_push_loads_back_with_open_clip(server: HubServer, clip_run: Path) -> None:
    import open_clip
    from huggingface_hub import ModelCard
    from PIL import Image

    hub.push_to_hub(clip_run, "alice/tiny-clip")
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= set(server.files("alice/tiny-clip"))
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:alice/tiny-clip")
    tokenizer = open_clip.get_tokenizer("hf-hub:alice/tiny-clip")
    local, _, local_preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_run / 'model'}")
    pil_image = Image.new("RGB", (64, 64), (200, 30, 30))
    image = preprocess(pil_image).unsqueeze(0)
    torch.testing.assert_close(image, local_preprocess(pil_image).unsqueeze(0))
    text = tokenizer(["a photo of a red circle", "a photo of a blue star"])
    model.eval()
    local.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), local.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(text), local.encode_text(text), rtol=0, atol=0)
    card = ModelCard.load("alice/tiny-clip")
    assert card.data.library_name == "open_clip" and card.data.pipeline_tag == "zero-shot-image-classification"
    assert "self-supervised" in card.data.tags and card.data.license is None, "no licence unless one is given"
    assert {r.metric_type for r in card.data.eval_results} == {"zero_shot_top1", "image_to_text_R@1", "text_to_image_R@1"}
    snippet = usage_snippet(card.text)
    assert '"hf-hub:alice/tiny-clip"' in snippet and "local-dir:" not in snippet
    scope = {"pil_image": pil_image}
    exec(snippet, scope)
    assert scope["probs"].shape == (1, 2)


# ----------------------------------------------------------------------------------- repo behaviour
def test_an_unchanged_folder_uploads_nothing(server: HubServer, mlm_run: Path) -> None:
    first = hub.push_to_hub(mlm_run, "alice/again")
    uploads = (server.count("commit"), server.count("lfs_upload"))
    second = hub.push_to_hub(mlm_run, "alice/again", exist_ok=True)
    assert (server.count("commit"), server.count("lfs_upload")) == uploads == (1, 2)  # one commit; weights + loss curve by LFS
    assert second.commit == first.commit and not second.changed
    assert server.repos["alice/again"].branches["main"] == first.commit


def test_a_private_repo_needs_the_token(server: HubServer, mlm_run: Path) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    hub.push_to_hub(mlm_run, "alice/secret", private=True)
    assert server.repos["alice/secret"].private
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", token=BOB_TOKEN)
    assert Path(hf_hub_download("alice/secret", "config.json", token=TOKEN)).read_bytes() == \
        (mlm_run / "model" / "config.json").read_bytes()


def test_a_revision_goes_to_its_branch(server: HubServer, mlm_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import hf_hub_download

    from multissl.cli import main

    server.add_repo("alice/branched", files={"notes.txt": b"main only\n"})
    code = main(["push", str(mlm_run), "--repo-id", "alice/branched", "--revision", "experiment", "--exist-ok",
                 "--commit-message", "try a branch"])
    assert code == 0 and "branch experiment" in capsys.readouterr().out
    on_branch, on_main = server.files("alice/branched", "experiment"), server.files("alice/branched", "main")
    assert "model.safetensors" in on_branch and "notes.txt" in on_branch
    assert set(on_main) == {"notes.txt"}
    repo = server.repos["alice/branched"]
    assert repo.messages[repo.branches["experiment"]] == "try a branch"
    path = hf_hub_download("alice/branched", "config.json", revision="experiment")
    assert Path(path).read_bytes() == (mlm_run / "model" / "config.json").read_bytes()


def test_transient_errors_are_retried_and_others_are_not(server: HubServer, mlm_run: Path) -> None:
    server.fail["create"] = [503]
    server.fail["commit"] = [502, 429]
    result = hub.push_to_hub(mlm_run, "alice/flaky")
    assert result.changed and server.count("create") == 2 and server.count("commit") == 3
    server.fail["commit"] = [409]
    with pytest.raises(HubError, match=r"^conflict while pushing to alice/conflict \(409\)"):
        hub.push_to_hub(mlm_run, "alice/conflict")
    assert server.count("commit") == 4, "a conflict is not retried"
    server.fail["create"] = [503, 503, 503]
    with pytest.raises(HubError, match=r"answered 503.*tried 3 times"):
        hub.push_to_hub(mlm_run, "alice/down")


def test_no_token_is_a_clear_error(tmp_path: Path, mlm_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer(tokens={TOKEN: "alice"}) as s:
        point_client_at(s.url, tmp_path / "empty_home", monkeypatch, token=None)
        with pytest.raises(HubError, match=r"no Hugging Face token: pass --token, set HF_TOKEN"):
            hub.push_to_hub(mlm_run, "alice/x")
        assert s.requests == []


# ------------------------------------------------------------------------------ the CLI's failures
@pytest.mark.parametrize("case", ["server down", "bad token", "another owner", "exists"])
def test_cli_failures_are_one_line_and_leave_the_output_alone(tmp_path: Path, mlm_run: Path, case: str) -> None:
    with HubServer(tokens={TOKEN: "alice", BOB_TOKEN: "bob"}) as s:
        s.add_repo("bob/taken")
        s.add_repo("alice/mine")
        url = closed_port_url() if case == "server down" else s.url
        token = "hf_NotAValidToken000000000000" if case == "bad token" else TOKEN
        repo = {"another owner": "bob/taken", "exists": "alice/mine"}.get(case, "alice/new")
        before = snapshot(mlm_run)
        proc = run([str(BIN / "multissl"), "push", str(mlm_run), "--repo-id", repo, "--token", token],
                   timeout=120, **client_env(url, tmp_path / "hf_home", token=None))
        requests = list(s.requests)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("multissl: error: "), proc.stderr
    needle = {"server down": f"cannot reach the Hub at {url}", "bad token": "rejected the token (401)",
              "another owner": "no write access to bob/taken (403)",
              "exists": "alice/mine already exists (409); pass --exist-ok"}[case]
    assert needle in lines[0]
    assert token not in proc.stdout + proc.stderr
    if case == "server down":
        assert "tried 3 times" in lines[0]
    else:
        assert [r for _, r, _ in requests] == ["create"], "not retried, nothing uploaded"
    assert snapshot(mlm_run) == before


# ---------------------------------------------------------------------------- pushing from training
def test_training_pushes_at_the_end(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from multissl_recipes import mlm

    out = tmp_path / "run"
    result = mlm.main(tiny_args(out, steps=2, **{"trainer.eval_max_batches": 1, "hub.push": "true",
                                                  "hub.repo_id": "alice/from-training"}))
    assert result.state.step == 2
    assert "pushed" in capsys.readouterr().out
    pushed = server.files("alice/from-training")
    assert pushed["model.safetensors"] == (out / "model" / "model.safetensors").read_bytes()
    assert b"repo_id: alice/from-training" in pushed["training_config.yaml"]
    for path, data in {**snapshot(out), **pushed}.items():
        assert TOKEN.encode() not in data, path


def test_a_failed_push_does_not_fail_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from multissl_recipes import mlm

    point_client_at(closed_port_url(), tmp_path / "hf_home", monkeypatch)
    monkeypatch.setattr(hub, "RETRY_DELAYS", (0.0, 0.0))
    out = tmp_path / "run"
    result = mlm.main(tiny_args(out, steps=2, **{"trainer.eval_max_batches": 1, "hub.push": "true",
                                                  "hub.repo_id": "alice/unreachable"}))
    assert result.state.step == 2 and result.final_metrics["loss"] > 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "README.md").is_file()
    printed = capsys.readouterr().out
    warning = [line for line in printed.splitlines() if line.startswith("warning: push to alice/unreachable failed:")]
    assert len(warning) == 1, printed
    assert f"the model is saved in {out / 'model'}; run: multissl push {out} --repo-id alice/unreachable" in warning[0]
    assert "cannot reach the Hub" in warning[0] and TOKEN not in printed
    for path, data in snapshot(out).items():
        assert TOKEN.encode() not in data, path


# ------------------------------------------------------------------------------------------- units
def test_the_usage_snippet_is_rendered_for_a_folder_or_a_repo(tmp_path: Path) -> None:
    template = ('m = AutoModel.from_pretrained("{repo}")\n'
                'c = open_clip.create_model_and_transforms("{open_clip_ref}")')
    folder = tmp_path / "run" / "model"
    assert card_lib.render_usage(template, folder) == (f'm = AutoModel.from_pretrained("{folder}")\n'
                                                  f'c = open_clip.create_model_and_transforms("local-dir:{folder}")')
    card = f"---\nlibrary_name: x\n---\n\n## How to use\n\n{card_lib._usage_marker(folder)}\n```python\n" \
           f"{card_lib.render_usage(template, folder)}\n```\n\n## Training configuration\n\n```json\n{{\"output_dir\": \"{folder}\"}}\n```\n"
    pushed = card_lib.retarget_card(card, "me/model")
    assert usage_snippet(pushed) == card_lib.render_usage(template, "me/model")
    assert f'"output_dir": "{folder}"' in pushed, "only the snippet changes"
    assert card_lib.retarget_card(card_lib.retarget_card(pushed, "org/other"), folder) == card, "retargeting is reversible"
    assert card_lib.retarget_card("# no marker\n```python\nx = 1\n```\n", "me/model") == "# no marker\n```python\nx = 1\n```\n"


def test_only_the_final_model_is_pushed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = run_dir / "model"
    for rel in ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/README.md",
                "model/optimizer.pt", "model/pytorch_model.bin", "model/scheduler.json", "model/.cache/x.json",
                "model/events.out.tfevents.1.host", "model/checkpoints/step_1/model.safetensors",
                "checkpoints/step_00000002/model.safetensors", "tensorboard/events.out.tfevents.2", "config.yaml"]:
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_bytes(b"x")
    assert find_model_folder(run_dir, HubError) == ModelFolder(model, run_dir)
    assert find_model_folder(model, HubError) == ModelFolder(model, run_dir)
    assert [p.as_posix() for p in hub.model_files(model)] == ["README.md", "config.json", "model.safetensors",
                                                             "tokenizer.json"]
    with pytest.raises(HubError, match="no such run or model folder"):
        find_model_folder(tmp_path / "nope", HubError)
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(HubError, match="no final model yet"):
        find_model_folder(tmp_path / "unfinished", HubError)


def test_files_an_earlier_push_left_are_removed(server: HubServer, mlm_run: Path, tmp_path: Path) -> None:
    """A weights or config file the new model lacks would be loaded beside it; it is deleted in the
    same commit. Files the owner added that are not model files stay; --keep-old-files keeps all."""
    import shutil

    from huggingface_hub import HfApi

    run = tmp_path / "run"
    shutil.copytree(mlm_run, run)
    (run / "model" / "vocab.txt").write_text("[PAD]\n")  # e.g. a tokenizer file of an earlier format
    hub.push_to_hub(run, "alice/pruned")
    for name, data in {"notes.txt": b"hand-written notes", "pytorch_model.bin": b"old weights"}.items():
        HfApi().upload_file(path_or_fileobj=data, path_in_repo=name, repo_id="alice/pruned")
    (run / "model" / "vocab.txt").unlink()
    kept = hub.push_to_hub(run, "alice/pruned", exist_ok=True, prune=False)
    assert kept.deleted == [] and "vocab.txt" in server.files("alice/pruned")
    result = hub.push_to_hub(run, "alice/pruned", exist_ok=True)
    assert result.deleted == ["pytorch_model.bin", "vocab.txt"] and result.changed
    files = server.files("alice/pruned")
    assert "notes.txt" in files and "model.safetensors" in files and "vocab.txt" not in files


def test_a_fine_tune_of_a_hub_model_names_its_base_and_loads_in_a_pipeline(server: HubServer, mlm_run: Path,
                                                                            tmp_path: Path) -> None:
    """Pretrain -> push -> fine-tune from the Hub id -> push: the card's base_model is that id, and
    the pushed classifier runs in transformers' pipeline from the Hub with the local predictions."""
    from huggingface_hub import ModelCard
    from multissl_recipes import finetune_text_classification
    from transformers import pipeline

    hub.push_to_hub(mlm_run, "alice/tiny-bert")
    out = tmp_path / "topics"
    finetune_text_classification.main([
        f"trainer.output_dir={out}", "trainer.max_steps=3", "trainer.batch_size=8", "trainer.progress_bar=false",
        "trainer.trackers=[]", "trainer.eval_max_batches=2", "data.max_seq_len=32", "model.init_from=alice/tiny-bert"])
    hub.push_to_hub(out, "alice/tiny-bert-topics")
    card = ModelCard.load("alice/tiny-bert-topics")
    assert card.data.base_model == "alice/tiny-bert" and card.data.pipeline_tag == "text-classification"
    assert "fine-tuned" in card.data.tags and "from the pretrained model `alice/tiny-bert`" in card.text
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy", "macro_f1"}
    classify = pipeline("text-classification", model="alice/tiny-bert-topics", device="cpu")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()][:4]
    for row in rows:
        got = classify(row["text"], truncation=True, max_length=32)[0]
        assert got["label"] == row["prediction"] and got["score"] == pytest.approx(row["score"], abs=1e-3)
    exec(usage_snippet(card.text), {})  # the pushed card's snippet runs against the Hub
