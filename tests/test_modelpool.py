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


def test_the_catalog_names_files_and_folders_and_says_what_a_misplaced_file_is(shelf: Shelf, model_cache: Path) -> None:
    catalog = checkpoints.model_catalog(shelf.models, "tiny-random", str(shelf.config), model_cache)
    assert catalog.names() == ["tiny-random", "base", "folder", "half", "lora", "merge", "styles/repainted"]
    assert catalog.lookup("merge", "model").path == shelf.models / "merge.safetensors"
    assert catalog.lookup("folder", "model").kind == "folder"
    # A1111's spellings: with the suffix, and its title "name [hash]".
    assert catalog.lookup("styles/repainted.safetensors", "model").name == "styles/repainted"
    merge_hash = models.file_sha256(shelf.models / "merge.safetensors", model_cache)[:10]
    assert catalog.lookup(f"merge [{merge_hash}]", "model").name == "merge"
    with pytest.raises(JobError, match=rf"model merge \[0123456789\]: .*merge.safetensors has the hash {merge_hash}, "
                                       r"not 0123456789 \(the file was replaced"):
        catalog.lookup("merge [0123456789]", "model")
    assert catalog.lookup("tiny-random", "model").kind == "default"
    with pytest.raises(JobError, match=r"model lora cannot be used: .*lora.safetensors holds no Stable Diffusion "
                                       r"UNet .*: it is a LoRA"):
        catalog.lookup("lora", "model")
    with pytest.raises(JobError, match=r"model half cannot be used: .*half.safetensors is incomplete or damaged"):
        catalog.lookup("half", "model")
    with pytest.raises(JobError) as unknown:
        catalog.lookup("merged", "model")
    assert unknown.value.message == f"unknown model merged: {shelf.models} holds no such file"
    # Only names that would render: not the LoRA or the cut file.
    assert unknown.value.hint == "did you mean merge? known: merge, tiny-random, base, folder, styles/repainted"
    # A checkpoint cannot load without model_config; a VAE beside a checkpoint is no model (A1111's rule).
    (shelf.models / "styles" / "repainted.vae.safetensors").write_bytes((shelf.vaes / "paint.safetensors").read_bytes())
    try:
        bare = checkpoints.model_catalog(shelf.models, "tiny-random")
        assert "styles/repainted.vae" not in bare.names()
        with pytest.raises(JobError, match="model merge cannot be used: .* needs model_config"):
            bare.lookup("merge", "model")
        assert bare.lookup("folder", "model").kind == "folder"  # a diffusers folder has its configs
    finally:
        (shelf.models / "styles" / "repainted.vae.safetensors").unlink()


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
    # The memory check: the warm weights are the three UNets plus one text encoder and one VAE:
    # base's came from a checkpoint, the configured model's from a folder, with equal weights.
    part_bytes = {part: sum(t.nelement() * t.element_size() for t in (*module.parameters(), *module.buffers()))
                  for part in ("unet", "vae", "text_encoder") if (module := getattr(warm["base"].pipe, part))}
    assert renderer.pool.weight_bytes() == 3 * part_bytes["unet"] + part_bytes["vae"] + part_bytes["text_encoder"]
    assert warm["base"].shared == ("text_encoder", "vae") and warm["base"].pipe.vae is warm[""].pipe.vae

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
    renderer.models = checkpoints.model_catalog(tmp_path / "odd", "tiny-random", str(shelf.config))
    with pytest.raises(ModelError, match=r"odd.safetensors does not fit the configs in .*: ValueError"):
        renderer.render(_job(rules, model="odd"), [5])
    renderer.models = checkpoints.model_catalog(shelf.models, "tiny-random", str(shelf.config), model_cache)
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


def test_a_model_file_replaced_under_a_running_daemon_is_loaded_again(
        shelf: Shelf, model_cache: Path, spool: Any, start_daemon: Any, tmp_path: Path) -> None:
    """Cut short in place, then replaced by another model's bytes: the daemon neither
    dies (the weights it holds are its own, not mapped from the file) nor goes on
    drawing the old model under the new file's hash."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    shutil.copy(shelf.models / "base.safetensors", models_dir / "zeta.safetensors")
    daemon = start_daemon(spool, SBRENDER_MODELS_DIR=str(models_dir), SBRENDER_MODEL_CONFIG=str(shelf.config))
    job = {"prompt": "a harbour", "seed": 1, "sampler": "Euler", "model": "zeta"}
    spool.drop("before.yaml", job)
    before = spool.result("before")
    assert before["status"] == "succeeded"
    with open(models_dir / "zeta.safetensors", "r+b") as f:
        f.truncate(4096)
    spool.drop("cut.yaml", job)
    cut = spool.result("cut")
    assert cut["status"] == "failed" and "zeta.safetensors is incomplete" in cut["error"]["message"]
    temp = models_dir / ".zeta.tmp"
    shutil.copy(shelf.models / "merge.safetensors", temp)
    temp.rename(models_dir / "zeta.safetensors")
    spool.drop("after.yaml", job)
    after = spool.result("after")
    assert after["status"] == "succeeded", after
    assert after["model"]["hash"] == models.file_sha256(shelf.models / "merge.safetensors", model_cache)[:10]
    from PIL import Image

    pixels = [Image.open(spool.outbox / r["images"][0]["file"]).tobytes() for r in (before, after)]
    assert pixels[0] != pixels[1]  # merge's UNet, not base's
    assert daemon.proc.poll() is None and daemon.events("model file changed; loading it again")


def test_a_daemon_on_the_cpu_survives_its_model_file_cut_short(
        shelf: Shelf, model_cache: Path, spool: Any, start_daemon: Any, tmp_path: Path) -> None:
    """safetensors maps a file's tensors into memory; on the CPU the loaded weights
    would stay those pages, and a file cut short under them kills the process with
    SIGBUS at the next render. The daemon copies them out at load."""
    model = tmp_path / "own.safetensors"
    shutil.copy(shelf.models / "base.safetensors", model)
    daemon = start_daemon(spool, SBRENDER_MODEL=str(model), SBRENDER_MODEL_CONFIG=str(shelf.config))
    spool.drop("before.yaml", {"prompt": "a harbour", "seed": 1})
    before = spool.result("before")
    with open(model, "r+b") as f:
        f.truncate(4096)
    spool.drop("after.yaml", {"prompt": "a harbour", "seed": 1})
    after = spool.result("after")
    assert daemon.proc.poll() is None and after["status"] == "succeeded"
    from PIL import Image

    pixels = [Image.open(spool.outbox / r["images"][0]["file"]).tobytes() for r in (before, after)]
    assert pixels[0] == pixels[1]  # the weights loaded at start, whatever became of the file


def test_a_model_whose_warm_up_fails_leaves_the_pool_as_it_was(
        shelf: Shelf, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With perf.compile, a model loaded for a job is warmed up (compiled) before it
    joins the pool and before any warm model leaves for it: a warm-up that fails
    fails that job with a ModelError and evicts nothing. (The warm-up itself is
    stood in for here: compiling on this CPU takes minutes; test_speed compiles.)"""
    from sbrender.errors import RenderError
    from sbrender.pipeline import DiffusersRenderer

    def warm_up(self: Any, model: str = "") -> None:
        if model == "merge":
            raise RenderError("out of GPU memory rendering 2 image(s) of 512x512")

    monkeypatch.setattr(DiffusersRenderer, "warm_up", warm_up)
    import torch

    monkeypatch.setattr(torch, "compile", lambda method, **options: method)  # routers, but nothing compiled
    renderer = _renderer(shelf, model_cache, tmp_path, **{"models.keep_loaded": 2, "perf.compile": "default"})
    rules = Rules.from_settings(renderer.settings)
    renderer.render(_job(rules, model="base"), [5])
    with pytest.raises(ModelError, match=r"cannot compile model merge: out of GPU memory"):
        renderer.render(_job(rules, model="merge"), [5])
    assert list(renderer.pool.warm) == ["", "base"]
    monkeypatch.setattr(DiffusersRenderer, "warm_up", lambda self, model="": None)
    assert renderer.render(_job(rules, model="merge"), [5]).model["name"] == "merge"  # tried again: not "broken"
    assert list(renderer.pool.warm) == ["base", "merge"]


def test_out_of_device_memory_sends_warm_models_away_one_at_a_time(
        shelf: Shelf, model_cache: Path, tmp_path: Path) -> None:
    """A CUDA out-of-memory at the move to the device: the least recently used warm
    model that shares nothing with the new one leaves, and the move is tried again,
    until it fits or nothing is left to go (then a ModelError, not a crash). CUDA
    cannot run here: the pipeline's ``to`` is stood in for."""
    import torch

    renderer = _renderer(shelf, model_cache, tmp_path, **{"models.keep_loaded": 4})
    rules = Rules.from_settings(renderer.settings)
    for name in ("base", "folder"):
        renderer.render(_job(rules, model=name), [5])

    class Pipe:
        def __init__(self, fails: int) -> None:
            self.fails = fails

        def to(self, device: str) -> "Pipe":
            if device != "cpu" and self.fails:
                self.fails -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB")
            return self

    renderer.device = "cuda"
    donors = {"vae": renderer.pool.warm["base"]}  # the new model shares base's VAE: base stays
    renderer._on_device(Pipe(fails=2), donors)
    assert list(renderer.pool.warm) == ["base"]  # "" then folder left, least recently used first
    with pytest.raises(ModelError, match="not enough device memory to load this model"):
        renderer._on_device(Pipe(fails=5), donors)
    assert list(renderer.pool.warm) == ["base"]
