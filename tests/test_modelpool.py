"""Several models per daemon (issue 12): a models folder of single-file SD1.x
checkpoints and diffusers folders, a job's ``model:`` and ``vae:``, warm models
kept up to ``models.keep_loaded`` with the parts they share loaded once, and a
bad file failing only its job."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ldm_checkpoint import VAE_PREFIX, ldm_state_dict
from sbrender import checkpoints, models
from sbrender.errors import JobError, ModelError
from sbrender.jobs import Job, Rules, build_job

UNET = "model.diffusion_model."


def _save(tensors: dict[str, Any], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _nudged(tensors: dict[str, Any], prefix: str, by: float) -> dict[str, Any]:
    return {k: (v + by if k.startswith(prefix) and v.is_floating_point() else v) for k, v in tensors.items()}


@dataclasses.dataclass(frozen=True)
class Shelf:
    """A models folder, a VAE folder and the config folder their checkpoints use."""

    config: Path  # the tiny-random diffusers folder: configs for every checkpoint, and a model itself
    models: Path
    vaes: Path


@pytest.fixture(scope="session")
def shelf(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Shelf:
    """models/: base (the tiny-random weights), merge (another UNet, the same VAE and text
    encoder: a merge of base), repainted (base's UNet and text encoder, another VAE),
    folder/ (a diffusers folder of base), lora (a LoRA put here by mistake), half (cut
    short); vae/: repainted's VAE as a file, as A1111's models/VAE holds them."""
    from diffusers import StableDiffusionPipeline

    config = models.ensure_builtin(models.BUILTINS["tiny-random"], model_cache)
    root = tmp_path_factory.mktemp("shelf")
    folder, vae_dir = root / "models", root / "vae"
    base = ldm_state_dict(StableDiffusionPipeline.from_pretrained(config, local_files_only=True))
    _save(base, folder / "base.safetensors")
    _save(_nudged(base, UNET, 0.02), folder / "merge.safetensors")
    repainted = _nudged(base, VAE_PREFIX + "decoder.", 0.05)
    _save(repainted, folder / "styles" / "repainted.safetensors")
    _save({k[len(VAE_PREFIX):]: v for k, v in repainted.items() if k.startswith(VAE_PREFIX)},
          vae_dir / "paint.safetensors")
    shutil.copytree(config, folder / "folder")
    _save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": base[UNET + "input_blocks.1.0.in_layers.0.weight"][:4, None]},
          folder / "lora.safetensors")
    data = (folder / "base.safetensors").read_bytes()
    (folder / "half.safetensors").write_bytes(data[: len(data) // 2])
    return Shelf(config, folder, vae_dir)


def _settings(shelf: Shelf, model_cache: Path, tmp_path: Path, **overrides: Any) -> Any:
    from sbrender.config import load_settings

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    return load_settings(empty, env={}, overrides={
        "model": "tiny-random", "cache": str(model_cache), "offline": True, "device": "cpu", "dtype": "float32",
        "models_dir": str(shelf.models), "vae_dir": str(shelf.vaes), "model_config": str(shelf.config),
        "loras_dir": str(tmp_path / "loras"), **overrides})


def _renderer(shelf: Shelf, model_cache: Path, tmp_path: Path, **overrides: Any) -> Any:
    from sbrender.pipeline import DiffusersRenderer

    renderer = DiffusersRenderer(_settings(shelf, model_cache, tmp_path, **overrides))
    renderer.load()
    return renderer


def _job(rules: Rules, **fields: Any) -> Job:
    return build_job("j", {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64, "seed": 5,
                           "sampler": "Euler", **fields}, rules)


def _pixels(out: Any) -> Any:
    import numpy as np

    return np.asarray(out.images[0], dtype=np.int16)


# --- the catalog ---------------------------------------------------------------------------


def test_the_catalog_names_files_and_folders_and_says_what_a_misplaced_file_is(shelf: Shelf) -> None:
    catalog = checkpoints.model_catalog(shelf.models, "tiny-random")
    assert catalog.names() == ["tiny-random", "base", "folder", "half", "lora", "merge", "styles/repainted"]
    assert catalog.lookup("merge", "model").path == shelf.models / "merge.safetensors"
    assert catalog.lookup("folder", "model").kind == "folder"
    # A1111's spellings: with the suffix, and its title "name [hash]".
    assert catalog.lookup("styles/repainted.safetensors", "model").name == "styles/repainted"
    assert catalog.lookup("merge [0123456789]", "model").name == "merge"
    assert catalog.lookup("tiny-random", "model").kind == "default"
    with pytest.raises(JobError, match=r"model lora cannot be used: .*lora.safetensors holds no Stable Diffusion "
                                       r"UNet .*: it is a LoRA"):
        catalog.lookup("lora", "model")
    with pytest.raises(JobError, match=r"model half cannot be used: .*half.safetensors is incomplete or damaged"):
        catalog.lookup("half", "model")
    with pytest.raises(JobError) as unknown:
        catalog.lookup("merged", "model")
    assert unknown.value.message == f"unknown model merged: {shelf.models} holds no such file"
    assert unknown.value.hint.startswith("did you mean merge? known: merge, tiny-random, base, folder")


def test_a_job_names_a_model_and_a_vae_checked_before_it_is_queued(shelf: Shelf, model_cache: Path,
                                                                   tmp_path: Path) -> None:
    rules = Rules.from_settings(_settings(shelf, model_cache, tmp_path))
    job = _job(rules, model="merge.safetensors", vae="paint")
    assert (job.model, job.vae) == ("merge", "paint")
    assert job.params()["model"] == "merge" and job.params()["vae"] == "paint"
    assert _job(rules, model="tiny-random").model == ""  # the configured model, by its own name
    assert _job(rules, vae="none").vae == "None"
    assert "model" not in _job(rules).params() and "vae" not in _job(rules).params()
    with pytest.raises(JobError, match="unknown model dreamshaper") as caught:
        _job(rules, model="dreamshaper")
    assert caught.value.field == "model"
    with pytest.raises(JobError, match="unknown VAE vae-ft-mse"):
        _job(rules, vae="vae-ft-mse")
    with pytest.raises(JobError, match="model must be a name, not an integer"):
        _job(rules, model=3)


# --- warm models -----------------------------------------------------------------------------


def test_models_that_share_parts_hold_them_once_and_render_as_if_loaded_alone(
        shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    renderer = _renderer(shelf, model_cache, tmp_path, **{"models.keep_loaded": 3})
    rules = Rules.from_settings(renderer.settings)
    alone = _renderer(shelf, model_cache, tmp_path, model=str(shelf.models / "merge.safetensors"))
    expected = _pixels(alone.render(_job(rules), [5]))

    base = renderer.render(_job(rules, model="base"), [5])
    merged = renderer.render(_job(rules, model="merge"), [5])
    assert (_pixels(merged) == expected).all()  # the same image as a daemon that only ever loaded it
    assert not (_pixels(base) == expected).all()
    assert merged.model["name"] == "merge" and merged.model["hash"] == models.file_sha256(
        shelf.models / "merge.safetensors", model_cache)[:10]
    assert merged.model["loaded_s"] > 0

    warm = renderer.pool.warm
    assert list(warm) == ["", "base", "merge"]
    # base and merge differ only in their UNets: one text encoder and one VAE for both.
    assert warm["merge"].pipe.text_encoder is warm["base"].pipe.text_encoder
    assert warm["merge"].pipe.vae is warm["base"].pipe.vae
    assert warm["merge"].pipe.unet is not warm["base"].pipe.unet
    assert warm["merge"].shared == ("text_encoder", "vae")
    # The memory check: the warm weights are the three UNets plus one text encoder and one VAE
    # from the checkpoints (the configured folder's parts are files of another layout: its own).
    part_bytes = {part: sum(t.nelement() * t.element_size() for t in (*module.parameters(), *module.buffers()))
                  for part in ("unet", "vae", "text_encoder") if (module := getattr(warm["base"].pipe, part))}
    assert renderer.pool.weight_bytes() == 3 * part_bytes["unet"] + 2 * (part_bytes["vae"] + part_bytes["text_encoder"])

    again = renderer.render(_job(rules, model="merge"), [5])  # warm: nothing loaded
    assert "loaded_s" not in again.model and (_pixels(again) == expected).all()


def test_the_least_recently_used_model_leaves_first(shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    renderer = _renderer(shelf, model_cache, tmp_path)  # keep_loaded 2
    rules = Rules.from_settings(renderer.settings)
    for name in ("base", "", "merge"):
        renderer.render(_job(rules, model=name or None), [5])
    assert list(renderer.pool.warm) == ["", "merge"]  # base, least recently used, left
    # Alternating between two warm models loads nothing.
    for name in ("", "merge", "", "merge"):
        assert "loaded_s" not in renderer.render(_job(rules, model=name or None), [5]).model
    assert "loaded_s" in renderer.render(_job(rules, model="base"), [5]).model


def test_a_memory_budget_keeps_fewer_models(shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    renderer = _renderer(shelf, model_cache, tmp_path, **{"models.keep_loaded": 4, "models.max_memory_mb": 1})
    rules = Rules.from_settings(renderer.settings)
    renderer.render(_job(rules, model="base"), [5])
    assert list(renderer.pool.warm) == ["base"]  # tiny-random weighs about 1.5 MB: one at a time


def test_a_vae_file_renders_as_a_checkpoint_that_holds_it(shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    """repainted = base's UNet and text encoder with paint's VAE: base with vae: paint is
    that model, pixel for pixel; the job's result names the file and A1111's VAE hash."""
    renderer = _renderer(shelf, model_cache, tmp_path, **{"models.keep_loaded": 3})
    rules = Rules.from_settings(renderer.settings)
    painted = renderer.render(_job(rules, model="base", vae="paint"), [5])
    repainted = renderer.render(_job(rules, model="styles/repainted", vae="None"), [5])
    plain = renderer.render(_job(rules, model="base"), [5])
    assert (_pixels(painted) == _pixels(repainted)).all()
    assert not (_pixels(painted) == _pixels(plain)).all()
    sha256 = models.file_sha256(shelf.vaes / "paint.safetensors", model_cache)
    assert painted.model["vae"] == {"name": "paint.safetensors", "hash": sha256[:10], "sha256": sha256}
    assert "vae" not in plain.model and "vae" not in repainted.model
    assert renderer.pool.warm["base"].pipe.vae is renderer.pool.warm["base"].own_vae  # given back after the job


def test_automatic_takes_a_vae_named_like_the_checkpoint(shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    vaes = tmp_path / "vae"
    vaes.mkdir()
    shutil.copy(shelf.vaes / "paint.safetensors", vaes / "base.safetensors")
    renderer = _renderer(dataclasses.replace(shelf, vaes=vaes), model_cache, tmp_path)
    rules = Rules.from_settings(renderer.settings)
    automatic = renderer.render(_job(rules, model="base"), [5])
    assert automatic.model["vae"]["name"] == "base.safetensors"
    assert "vae" not in renderer.render(_job(rules, model="base", vae="None"), [5]).model


def test_a_bad_model_fails_its_job_and_leaves_the_warm_ones_alone(shelf: Shelf, model_cache: Path,
                                                                   tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    renderer = _renderer(shelf, model_cache, tmp_path)
    rules = Rules.from_settings(renderer.settings, with_loras=False)  # as the daemon parses: names checked late
    before = _pixels(renderer.render(_job(rules), [5]))
    odd = load_file(str(shelf.models / "base.safetensors"))
    odd[UNET + "out.2.weight"] = torch.zeros(4, 16, 3, 3)  # another architecture's shapes
    _save(odd, tmp_path / "odd" / "odd.safetensors")
    renderer.models = checkpoints.model_catalog(tmp_path / "odd", "tiny-random")
    with pytest.raises(ModelError, match=r"odd.safetensors does not fit the configs in .*: ValueError"):
        renderer.render(_job(rules, model="odd"), [5])
    renderer.models = checkpoints.model_catalog(shelf.models, "tiny-random")
    for name, error, words in (("lora", JobError, "it is a LoRA"), ("half", JobError, "is incomplete or damaged"),
                               ("nowhere", JobError, "unknown model nowhere")):
        with pytest.raises(error, match=words):
            renderer.render(_job(rules, model=name), [5])
    assert list(renderer.pool.warm) == [""]
    assert (_pixels(renderer.render(_job(rules), [5])) == before).all()


def test_a_lora_on_one_model_does_not_reach_a_model_sharing_its_text_encoder(
        shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    from test_loras import kohya_lora, write_lora

    write_lora(tmp_path / "loras" / "style.safetensors", kohya_lora(model_cache, seed=1))
    renderer = _renderer(shelf, model_cache, tmp_path, **{"models.keep_loaded": 3})
    rules = Rules.from_settings(renderer.settings)
    merge_plain = _pixels(renderer.render(_job(rules, model="merge"), [5]))
    base_lora = _pixels(renderer.render(_job(rules, model="base", prompt="a lighthouse <lora:style:0.8>"), [5]))
    assert (_pixels(renderer.render(_job(rules, model="merge"), [5])) == merge_plain).all()
    assert (_pixels(renderer.render(_job(rules, model="base", prompt="a lighthouse <lora:style:0.8>"), [5]))
            == base_lora).all()
    merge_lora = _pixels(renderer.render(_job(rules, model="merge", prompt="a lighthouse <lora:style:0.8>"), [5]))
    assert not (merge_lora == merge_plain).all()
    assert (_pixels(renderer.render(_job(rules, model="base", prompt="a lighthouse <lora:style:0.8>"), [5]))
            == base_lora).all()


def test_jobs_of_different_models_or_vaes_never_share_a_call(shelf: Shelf, model_cache: Path,
                                                             tmp_path: Path) -> None:
    from sbrender.renderer import call_key

    rules = Rules.from_settings(_settings(shelf, model_cache, tmp_path))
    keys = {call_key(_job(rules)), call_key(_job(rules, model="merge")), call_key(_job(rules, vae="paint"))}
    assert len(keys) == 3
    assert call_key(_job(rules, model="merge")) == call_key(_job(rules, model="merge.safetensors"))


def test_sbrender_models_lists_the_folder_with_a1111_hashes(shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    from sbrender.inventory import inventory

    listing = inventory(_settings(shelf, model_cache, tmp_path))
    items = {item["name"]: item for item in listing["models"]["items"]}
    sha256 = models.file_sha256(shelf.models / "merge.safetensors", model_cache)
    assert items["merge"]["hash"] == sha256[:10] and items["merge"]["kind"] == "checkpoint"
    assert items["folder"]["kind"] == "folder"
    assert "it is a LoRA" in items["lora"]["problem"]
    vaes = {item["name"]: item for item in listing["vae"]["items"]}
    assert vaes["paint"]["hash"] == models.file_sha256(shelf.vaes / "paint.safetensors", model_cache)[:10]
    assert json.dumps(listing)  # the --json form


# --- a real daemon ---------------------------------------------------------------------------


def test_a_daemon_renders_a_queue_alternating_between_models_without_reloading(
        shelf: Shelf, model_cache: Path, spool: Any, start_daemon: Any) -> None:
    """Dropped files alternate between three models and a VAE; keep_loaded 3 holds them
    all: each loads once (logged with its time, counted in its first job's load_s), the
    results and the PNGs' infotext (read by A1111's parser) name each job's model, and a
    job naming a LoRA file as its model fails alone with the reason."""
    from PIL import Image

    from test_infotext import parse_generation_parameters

    names = ["base", "merge", "", "base", "merge", "", "base"]
    for k, name in enumerate(names):
        spool.drop(f"job-{k}.yaml", {"prompt": f"a harbour, take {k}", "seed": k, "sampler": "Euler",
                                     **({"model": name} if name else {}), **({"vae": "paint"} if k == 3 else {})})
    spool.drop("wrong.yaml", {"prompt": "a harbour", "model": "lora"})
    daemon = start_daemon(spool, SBRENDER_MODELS_DIR=str(shelf.models), SBRENDER_VAE_DIR=str(shelf.vaes),
                          SBRENDER_MODEL_CONFIG=str(shelf.config), SBRENDER_MODELS_KEEP_LOADED="3")
    results = {k: spool.result(f"job-{k}") for k in range(len(names))}
    wrong = spool.result("wrong")
    assert wrong["status"] == "failed" and "model lora cannot be used" in wrong["error"]["message"]
    assert "it is a LoRA" in wrong["error"]["message"]
    for k, name in enumerate(names):
        result = results[k]
        assert result["status"] == "succeeded", result
        assert result["model"]["name"] == (name or "tiny-random")
        params = parse_generation_parameters(Image.open(spool.outbox / result["images"][0]["file"]).text["parameters"])
        assert params["Model"] == (name or "tiny-random")
        if name:
            sha256 = models.file_sha256(shelf.models / f"{name}.safetensors", model_cache)
            assert params["Model hash"] == sha256[:10] == result["model"]["hash"]
        if k == 3:
            vae = models.file_sha256(shelf.vaes / "paint.safetensors", model_cache)
            assert (params["VAE hash"], params["VAE"]) == (vae[:10], "paint.safetensors")
            assert result["model"]["vae"]["sha256"] == vae
        else:
            assert "VAE" not in params
    loads = daemon.events("model loaded")
    assert [line["model"] for line in loads] == ["tiny-random", "base", "merge"]  # once each, in queue order
    assert loads[2]["shared"] == ["text_encoder", "vae"]
    assert results[0]["model"]["loaded_s"] > 0 and "loaded_s" not in results[3]["model"]
    assert results[0]["timings"]["load_s"] >= results[0]["model"]["loaded_s"]


def test_submit_and_models_speak_of_the_models_folder(shelf: Shelf, model_cache: Path, spool: Any) -> None:
    from conftest import daemon_env, sbrender

    env = daemon_env(model_cache, SBRENDER_MODELS_DIR=str(shelf.models), SBRENDER_VAE_DIR=str(shelf.vaes),
                     SBRENDER_MODEL_CONFIG=str(shelf.config))
    refused = sbrender("submit", "a cat", "--model", "dreamshapr", *spool.cli_args(), env=env, cwd=spool.root)
    assert refused.returncode == 1 and "unknown model dreamshapr" in refused.stderr
    assert "known: tiny-random, base, folder" in refused.stderr
    assert not list(spool.inbox.iterdir())
    ok = sbrender("submit", "a cat", "--model", "merge", "--vae", "paint", "--id", "m1", *spool.cli_args(),
                  env=env, cwd=spool.root, check=True)
    assert json.loads((spool.inbox / "m1.json").read_text())["model"] == "merge"
    listing = sbrender("models", *spool.cli_args(), env=env, cwd=spool.root, check=True).stdout
    sha256 = models.file_sha256(shelf.models / "merge.safetensors", model_cache)
    assert f"merge             checkpoint  {sha256[:10]}" in listing
    assert "unusable: holds no Stable Diffusion UNet" in listing and ok.stdout.strip() == "m1"
