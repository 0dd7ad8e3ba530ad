"""Single-file .safetensors checkpoints (the LDM layout of A1111's community
models), loaded offline with a local config folder; the model hash in results
and PNGs; what a user sees when the file or its config is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import Spool, daemon_env, sbrender
from ldm_checkpoint import write_checkpoint
from sbrender import models
from sbrender.errors import ModelError
from test_infotext import parse_generation_parameters


@pytest.fixture(scope="session")
def tiny_folder(model_cache: Path) -> Path:
    return models.ensure_builtin(models.BUILTINS["tiny-random"], model_cache)


@pytest.fixture(scope="session")
def checkpoint(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-random pipeline as one LDM-layout checkpoint, as civitai serves SD1.5 models."""
    return write_checkpoint(tiny_folder, tmp_path_factory.mktemp("checkpoints") / "tiny-ckpt.safetensors")


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(tensors: dict[str, Any], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach a host fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_checkpoint_loads_offline_with_every_weight_of_its_folder(checkpoint: Path, tiny_folder: Path,
                                                                  model_cache: Path, no_network: None) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    keys = _tensors(checkpoint).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    ref = models.resolve(str(checkpoint), model_cache, str(tiny_folder))
    assert (ref.kind, ref.location, ref.config) == ("checkpoint", str(checkpoint), str(tiny_folder))
    loaded = models.load_pipeline(ref, dtype=torch.float32, offline=False, safety_checker=False)
    original = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys(), part
        different = [k for k in want if not torch.equal(want[k], got[k])]
        assert not different, f"{part}: {different[:5]}"
    assert type(loaded.scheduler) is type(original.scheduler)
    assert loaded.tokenizer("a cat").input_ids == original.tokenizer("a cat").input_ids


def _run_once(spool: Spool, env: dict[str, str]) -> dict[str, Any]:
    spool.drop("lighthouse.yaml", "prompt: a lighthouse at dusk\nseed: 1234\ncount: 2\nsteps: 3\n")
    proc = sbrender("run", "--once", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((spool.outbox / "lighthouse.json").read_text())


def test_checkpoint_renders_the_same_images_as_its_folder_and_records_its_hash(
        tmp_path: Path, model_cache: Path, checkpoint: Path, tiny_folder: Path) -> None:
    # An empty HF cache, offline: nothing may come from the hub.
    hub = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    from_folder = Spool(tmp_path / "folder")
    folder_result = _run_once(from_folder, daemon_env(model_cache, SBRENDER_MODEL=str(tiny_folder), **hub))
    from_file = Spool(tmp_path / "file")
    result = _run_once(from_file, daemon_env(model_cache, SBRENDER_MODEL=str(checkpoint),
                                             SBRENDER_MODEL_CONFIG=str(tiny_folder), **hub))
    assert result["status"] == folder_result["status"] == "succeeded"
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert result["model"] == {"name": str(checkpoint), "source": "checkpoint", "location": str(checkpoint),
                               "config": str(tiny_folder), "random_weights": False, "sha256": sha256,
                               "hash": sha256[:10]}
    assert "hash" not in folder_result["model"]
    for mine, theirs in zip(result["images"], folder_result["images"], strict=True):
        image = Image.open(from_file.outbox / mine["file"])
        reference = Image.open(from_folder.outbox / theirs["file"])
        assert image.tobytes() == reference.tobytes(), "same weights, same seed: the same pixels"
        # The PNGs differ only in what they say about the model.
        params = parse_generation_parameters(image.text["parameters"])
        assert params["Model hash"] == sha256[:10] and params["Model"] == "tiny-ckpt"
        assert ", Model hash: " + sha256[:10] + ", Model: tiny-ckpt" in image.text["parameters"]
        assert "Model hash" not in parse_generation_parameters(reference.text["parameters"])


def test_checkpoint_without_model_config_stops_the_start(spool: Spool, model_cache: Path, checkpoint: Path) -> None:
    spool.drop("waiting.yaml", "prompt: must not be lost\n")
    proc = sbrender("run", "--model", str(checkpoint), *spool.cli_args(), cwd=spool.root,
                    env=daemon_env(model_cache))
    assert proc.returncode == 2
    assert f"model checkpoint {checkpoint} needs model_config" in proc.stderr
    assert "set model_config (SBRENDER_MODEL_CONFIG) to a diffusers folder" in proc.stderr
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json'" in proc.stderr
    assert (spool.inbox / "waiting.yaml").exists()


def _truncated(checkpoint: Path, tmp_path: Path) -> Path:
    data = checkpoint.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "half.safetensors"


def _file(name: str, data: bytes) -> Any:
    def make(checkpoint: Path, tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return make


def _lora(checkpoint: Path, tmp_path: Path) -> Path:
    only_text = {k: v for k, v in _tensors(checkpoint).items() if k.startswith("cond_stage_model.")}
    return _save(only_text, tmp_path / "lora.safetensors")


@pytest.mark.parametrize("make, config, expected", [
    (lambda c, t: t / "missing.safetensors", "tiny", "missing.safetensors does not exist"),
    (lambda c, t: Path("models/missing.safetensors"), "tiny", "models/missing.safetensors does not exist"),
    (_truncated, "tiny", "is incomplete or damaged"),
    (_file("junk.safetensors", b"<html>404</html>"), "tiny", "is not a safetensors file"),
    (_lora, "tiny", "holds no Stable Diffusion UNet"),
    (_file("old.ckpt", b"pickle"), "tiny", "is a pickled checkpoint (.ckpt); loading one can run any code"),
    (lambda c, t: c, "", "needs model_config"),
    (lambda c, t: c, "/nonexistent/sd15-config", "neither an existing folder nor a Hugging Face repo id"),
    (lambda c, t: c, "empty-dir", "has no model_index.json"),
    (lambda c, t: c, "v1-inference.yaml", "is a file; it must be a diffusers folder"),
    (lambda c, t: c, "someone/sd15-configs", "is not in the Hugging Face cache"),
])
def test_a_bad_checkpoint_or_config_is_refused_with_what_to_do(
        checkpoint: Path, tiny_folder: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make: Any, config: str, expected: str) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "v1-inference.yaml").write_text("model: {}\n")
    path = make(checkpoint, tmp_path)
    with pytest.raises(ModelError) as caught:
        models.resolve(str(path), model_cache, str(tiny_folder) if config == "tiny" else config)
    assert expected in caught.value.message
    assert caught.value.hint


def test_model_config_may_be_a_repo_in_the_hugging_face_cache(checkpoint: Path, tiny_folder: Path,
                                                               model_cache: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The layout `hf download` leaves: refs/main names the snapshot holding the files.
    repo = tmp_path / "hub" / "models--someone--sd15-configs"
    snapshot = repo / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_folder, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = models.resolve(str(checkpoint), model_cache, "someone/sd15-configs")
    assert ref.config == str(snapshot)


@pytest.mark.parametrize("change, expected", [
    # Configs of another architecture: the weights land on layers of other shapes.
    ("layers", "ValueError: Cannot load because "),
    # Weights of another shape.
    ("shape", "ValueError: Cannot load because conv_out.weight expected shape torch.Size([4, 32, 3, 3]), "
              "but got torch.Size([4, 16, 3, 3])"),
    # A partial checkpoint.
    ("missing", "lacks weights the configs need"),
])
def test_a_checkpoint_that_does_not_fit_its_config_is_refused(
        checkpoint: Path, tiny_folder: Path, model_cache: Path, tmp_path: Path, change: str, expected: str) -> None:
    import torch

    config = tmp_path / "config"
    shutil.copytree(tiny_folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    path = checkpoint
    if change == "layers":
        unet = json.loads((config / "unet" / "config.json").read_text())
        (config / "unet" / "config.json").write_text(json.dumps({**unet, "layers_per_block": 2}))
    elif change == "shape":
        tensors = _tensors(checkpoint)
        weight = tensors["model.diffusion_model.out.2.weight"]
        tensors["model.diffusion_model.out.2.weight"] = weight[:, : weight.shape[1] // 2].contiguous()
        path = _save(tensors, tmp_path / "narrow.safetensors")
    else:
        tensors = {k: v for k, v in _tensors(checkpoint).items() if ".out_layers.3." not in k}
        path = _save(tensors, tmp_path / "partial.safetensors")
    ref = models.resolve(str(path), model_cache, str(config))
    with pytest.raises(ModelError) as caught:
        models.load_pipeline(ref, dtype=torch.float32, offline=True, safety_checker=False)
    assert f"does not fit the configs in {config}" in caught.value.message
    assert expected in caught.value.message
    assert "architecture" in (caught.value.hint or "")


def test_the_safety_checker_comes_from_the_config_folder(checkpoint: Path, tiny_folder: Path, model_cache: Path,
                                                         tmp_path: Path) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = tmp_path / "config"
    shutil.copytree(tiny_folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((config / "model_index.json").read_text())
    (config / "model_index.json").write_text(json.dumps({
        **index, "requires_safety_checker": True, "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"]}))
    CLIPImageProcessor(crop_size=32, size=32).save_pretrained(config / "feature_extractor")
    ref = models.resolve(str(checkpoint), model_cache, str(config))
    with pytest.raises(ModelError) as caught:
        models.load_pipeline(ref, dtype=torch.float32, offline=True, safety_checker=True)
    assert f"safety_checker is on but model_config {config} holds no safety checker weights" in caught.value.message
    assert "or set safety_checker: false" in (caught.value.hint or "")
    # Off, the config's safety checker is not needed.
    assert models.load_pipeline(ref, dtype=torch.float32, offline=True, safety_checker=False).safety_checker is None

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tiny, projection_dim=32,
                                                      vision_config={**tiny, "image_size": 32, "patch_size": 4}))
    checker.save_pretrained(config / "safety_checker")
    pipe = models.load_pipeline(ref, dtype=torch.float32, offline=True, safety_checker=True)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    assert pipe(prompt="a cat", num_inference_steps=1, width=64, height=64).nsfw_content_detected == [False]


def test_the_hash_is_read_once_and_kept_by_path_size_and_mtime(checkpoint: Path, tiny_folder: Path,
                                                               tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(checkpoint, copy)
    real = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert models.resolve(str(copy), cache, str(tiny_folder)).sha256 == real
    store = cache / models.HASHES_FILE
    entry = json.loads(store.read_text())[str(copy)]
    assert entry == {"size": copy.stat().st_size, "mtime_ns": copy.stat().st_mtime_ns, "sha256": real}
    # A second resolve takes the stored hash: a planted value comes back, so the file was not read.
    store.write_text(json.dumps({str(copy): {**entry, "sha256": "f" * 64}}))
    assert models.resolve(str(copy), cache, str(tiny_folder)).sha256 == "f" * 64
    # The file changed (a new modification time): hashed again.
    os.utime(copy, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    assert models.resolve(str(copy), cache, str(tiny_folder)).sha256 == real
    assert json.loads(store.read_text())[str(copy)]["sha256"] == real


def test_doctor_checks_a_checkpoint_and_its_config(spool: Spool, model_cache: Path, checkpoint: Path,
                                                   tiny_folder: Path) -> None:
    env = daemon_env(model_cache, SBRENDER_MODEL=str(checkpoint), SBRENDER_MODEL_CONFIG=str(tiny_folder))
    proc = sbrender("doctor", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    short = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ok    model: ")]
    assert line.startswith(f"ok    model: checkpoint {checkpoint} (8 MiB, ")
    assert line.endswith(f"model hash {short}); configs from {tiny_folder}")

    env["SBRENDER_MODEL_CONFIG"] = ""
    proc = sbrender("doctor", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 1
    assert f"fail  model: model checkpoint {checkpoint} needs model_config" in proc.stdout
    assert "      fix: set model_config (SBRENDER_MODEL_CONFIG) to a diffusers folder" in proc.stdout
