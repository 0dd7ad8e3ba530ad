"""Textual-inversion embedding files: found, hashed and read as A1111 does them, a
pickle that would run code refused unrun; listed by `sbrender models` and `doctor`
without torch where possible; used by a live daemon in the prompt and the negative."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import Spool, daemon_env, sbrender
from sbrender import embeddings

WIDTH = 32  # the tiny model's text encoder


def vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


class Evil:
    """Unpickling it opens (creates) a file: what a hostile .pt does, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """One file of every kind A1111 reads, and the ones it cannot use."""
    root = tmp_path / "embeddings"
    (root / "neg").mkdir(parents=True)
    save_file({"emb_params": vectors(3, 1)}, root / "glow.safetensors")  # civitai's layout
    torch.save({"string_to_param": {"*": vectors(2, 2)}, "name": "ignored", "step": 500},
               root / "neg" / "badhands.pt")  # A1111's own .pt
    torch.save({"<fog>": vectors(1, 3)[0]}, root / "fog.bin")  # diffusers' learned_embeds.bin: one (C,) vector
    old_style = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(4, 10))})  # the LDM repo's own .pt
    torch.save({"string_to_param": old_style, "string_to_token": {"*": torch.tensor(265)}}, root / "neg" / "ldm.pt")
    save_file({"emb_params": vectors(2, 4, 768)}, root / "sd15only.safetensors")
    save_file({"clip_g": vectors(2, 5, 1280), "clip_l": vectors(2, 5, 768)}, root / "xl.safetensors")
    torch.save({"string_to_param": {"*": vectors(1, 6), "+": vectors(1, 7)}}, root / "two.pt")
    torch.save({"string_to_param": {"*": vectors(1, 8)}, "hook": Evil(tmp_path / "pwned")}, root / "evil.pt")
    whole = (root / "glow.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(whole[:-10])
    (root / "junk.pt").write_bytes(b"not a pickle at all")
    (root / "empty.pt").write_bytes(b"")  # A1111 skips empty files
    (root / "notes.txt").write_text("not an embedding")
    return root


def test_the_listing_reads_headers_and_hashes_files_as_a1111(folder: Path, tmp_path: Path) -> None:
    files = {f.name: f for f in embeddings.scan(folder, tmp_path / "cache", WIDTH)}
    assert sorted(files) == ["badhands", "cut", "evil", "fog", "glow", "junk", "ldm", "sd15only", "two", "xl"]
    glow = files["glow"]
    sha = hashlib.sha256((folder / "glow.safetensors").read_bytes()).hexdigest()
    assert (glow.usable, glow.vectors, glow.width, glow.sha256, glow.hash) == (True, 3, WIDTH, sha, sha[:12])
    # pickled files are not opened by the listing: their shape waits for the weights-only load
    assert files["badhands"].usable and files["badhands"].vectors is None
    assert files["sd15only"].problem.startswith(
        f"holds vectors of width 768, and this model's text encoder takes {WIDTH}")
    assert files["xl"].problem == ("holds 2 tensors (clip_g, clip_l) (an SDXL embedding); "
                                   "an embedding file holds exactly one")
    assert files["cut"].problem.startswith("is incomplete or damaged")
    # hashes are kept by path, size and mtime: a changed file is hashed again
    cached = json.loads((tmp_path / "cache" / "model-hashes.json").read_text())
    assert cached[str(folder / "glow.safetensors")]["sha256"] == sha
    save_file({"emb_params": vectors(4, 9)}, folder / "glow.safetensors")
    again = {f.name: f for f in embeddings.scan(folder, tmp_path / "cache", WIDTH)}["glow"]
    assert again.vectors == 4 and again.sha256 == hashlib.sha256((folder / "glow.safetensors").read_bytes()).hexdigest()


def test_loading_reads_every_layout_and_refuses_what_it_cannot_use(folder: Path, tmp_path: Path) -> None:
    catalog = embeddings.load(folder, tmp_path / "cache", WIDTH)
    # A1111's order: a folder's files, then its subfolders'
    assert list(catalog.vectors) == ["fog", "glow", "badhands", "ldm"]
    torch.testing.assert_close(catalog.vectors["glow"], vectors(3, 1), rtol=0, atol=0)
    torch.testing.assert_close(catalog.vectors["badhands"], vectors(2, 2), rtol=0, atol=0)
    torch.testing.assert_close(catalog.vectors["fog"], vectors(1, 3), rtol=0, atol=0)
    torch.testing.assert_close(catalog.vectors["ldm"], vectors(4, 10), rtol=0, atol=0)
    assert catalog.counts() == {"fog": 1, "glow": 3, "badhands": 2, "ldm": 4}
    problems = {f.name: f.problem for f in catalog.files if not f.usable}
    assert sorted(problems) == ["cut", "evil", "junk", "sd15only", "two", "xl"]
    assert problems["junk"].startswith("cannot be read weights-only (Unsupported operand 110): a damaged file, or")
    assert problems["two"] == "has 2 terms in string_to_param; an embedding file holds one"
    assert catalog.record("badhands", "negative_prompt") == {
        "name": "badhands", "vectors": 2, "hash": catalog.usable()["badhands"].hash, "in": "negative_prompt"}


def test_a_pickle_that_would_run_code_is_refused_and_never_run(folder: Path, tmp_path: Path) -> None:
    catalog = embeddings.load(folder, tmp_path / "cache", WIDTH)
    (evil,) = [f for f in catalog.files if f.name == "evil"]
    assert evil.problem == ("needs full unpickling (it names io.open, which is no tensor); loading it could run code "
                            "it holds, so sbrender does not: convert it where you trust it, with "
                            "safetensors.torch.save_file")
    assert "evil" not in catalog.vectors
    assert not (tmp_path / "pwned").exists()
    # the file does run code when unpickled in full: the test can fail
    torch.load(folder / "evil.pt", weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_of_two_files_of_one_name_the_later_in_a1111s_order_is_used(tmp_path: Path) -> None:
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    save_file({"emb_params": vectors(1, 1)}, root / "glow.safetensors")
    save_file({"emb_params": vectors(2, 2)}, root / "sub" / "glow.safetensors")
    catalog = embeddings.load(root, tmp_path / "cache", WIDTH)
    torch.testing.assert_close(catalog.vectors["glow"], vectors(2, 2), rtol=0, atol=0)
    (shadowed,) = [f for f in catalog.files if not f.usable]
    assert shadowed.path == str(root / "glow.safetensors")
    assert shadowed.problem == f"has the same name as {root / 'sub' / 'glow.safetensors'}, which is used"


def test_a_link_back_up_the_folder_is_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    save_file({"emb_params": vectors(1, 1)}, root / "sub" / "glow.safetensors")
    (root / "sub" / "loop").symlink_to(root)
    assert [f.path for f in embeddings.scan(root, tmp_path / "cache")] == [str(root / "sub" / "glow.safetensors")]


def test_a_missing_folder_is_no_embeddings(tmp_path: Path) -> None:
    assert embeddings.scan(tmp_path / "nowhere", tmp_path / "cache") == []
    assert embeddings.load(tmp_path / "nowhere", tmp_path / "cache", WIDTH).vectors == {}


# --- the command line -----------------------------------------------------------------


def no_torch(tmp_path: Path) -> str:
    """A folder to put first on PYTHONPATH whose ``torch`` cannot be imported."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not for this command')\n")
    return str(fake.parent)


def test_models_lists_the_model_and_embeddings_without_torch(folder: Path, tmp_path: Path, model_cache: Path) -> None:
    env = daemon_env(model_cache, SBRENDER_EMBEDDINGS_DIR=str(folder), PYTHONPATH=no_torch(tmp_path))
    proc = sbrender("models", "--json", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = json.loads(proc.stdout)
    assert listing["model"]["items"] == [{"name": "tiny-random", "kind": "builtin"}]
    assert listing["embeddings"]["source"] == str(folder)
    items = {item["name"]: item for item in listing["embeddings"]["items"]}
    glow_hash = hashlib.sha256((folder / "glow.safetensors").read_bytes()).hexdigest()[:12]
    assert items["glow"]["vectors"] == 3 and items["glow"]["hash"] == glow_hash
    assert "problem" not in items["glow"] and "needs full unpickling" not in json.dumps(items["evil"])  # not opened
    assert items["xl"]["problem"].startswith("holds 2 tensors")

    proc = sbrender("models", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["model", "  NAME         KIND     HASH", "  tiny-random  builtin  -"]
    assert lines[3:7] == ["models", "  none", "vae", "  none"]  # no models_dir or vae_dir here
    assert lines[7] == f"embeddings ({folder})"
    assert lines[8].split() == ["NAME", "VECTORS", "HASH"]
    assert f"  glow      3        {items['glow']['hash']}" in lines
    assert any(line.startswith("  sd15only  2 ") and "unusable: holds vectors of width 768" in line for line in lines)
    assert any(line.startswith("  badhands  -") and "read (weights-only) when the daemon loads it" in line
               for line in lines)


def test_doctor_names_the_files_the_daemon_would_skip(folder: Path, tmp_path: Path, model_cache: Path) -> None:
    spool = Spool(tmp_path / "spool")
    env = daemon_env(model_cache, SBRENDER_EMBEDDINGS_DIR=str(folder))
    proc = sbrender("doctor", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # skipped files are warnings: the daemon starts
    assert f"ok    embeddings: {folder}: 4 usable (fog, glow, badhands, ldm)" in proc.stdout
    assert f"warn  embeddings: {folder / 'evil.pt'} needs full unpickling (it names io.open" in proc.stdout
    assert f"warn  embeddings: {folder / 'two.pt'} has 2 terms in string_to_param" in proc.stdout
    assert not (tmp_path / "pwned").exists()
    proc = sbrender("doctor", *spool.cli_args(), env=daemon_env(model_cache), cwd=spool.root)
    assert f"ok    embeddings: {spool.root / 'embeddings'} does not exist: no textual-inversion embeddings" in proc.stdout


# --- end to end -----------------------------------------------------------------------


def test_a_daemon_renders_embeddings_in_both_prompts_as_the_hand_built_conditioning(
        folder: Path, tmp_path: Path, model_cache: Path) -> None:
    """The image equals the same diffusers pipeline fed the conditioning built by hand:
    the embeddings' vectors as new vocabulary rows where A1111 places them."""
    import diffusers
    import numpy as np
    from PIL import Image

    from sbrender.models import BUILTINS, ensure_builtin

    spool = Spool(tmp_path / "spool")
    prompt, negative = "a cat, Glow on a mat", "badhands, blurry, glow"
    spool.drop("emb.json", {"prompt": prompt, "negative_prompt": negative, "seed": 3})
    spool.drop("text.json", {"prompt": "a cat, glowing on a mat", "negative_prompt": "blurry", "seed": 3})
    spool.drop("skipped.json", {"prompt": "a cat, EVIL", "negative_prompt": "xl, blurry, evildoer", "seed": 3,
                                "steps": 2})
    env = daemon_env(model_cache, SBRENDER_EMBEDDINGS_DIR=str(folder))
    proc = sbrender("run", "--once", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "pwned").exists()
    skipped = [json.loads(line) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
               if '"embedding skipped"' in line]
    assert sorted(Path(e["file"]).name for e in skipped) == sorted(
        ["cut.safetensors", "evil.pt", "junk.pt", "sd15only.safetensors", "two.pt", "xl.safetensors"])
    result = json.loads((spool.outbox / "emb.json").read_text())
    assert result["status"] == "succeeded", result.get("error")
    files = {f.name: f for f in embeddings.scan(folder, model_cache)}
    assert result["prompt"]["embeddings"] == [
        {"name": "glow", "vectors": 3, "hash": files["glow"].hash, "in": "prompt"},
        {"name": "badhands", "vectors": 2, "hash": files["badhands"].hash, "in": "negative_prompt"},
        {"name": "glow", "vectors": 3, "hash": files["glow"].hash, "in": "negative_prompt"},
    ]
    plain = json.loads((spool.outbox / "text.json").read_text())
    assert plain["status"] == "succeeded" and "embeddings" not in plain["prompt"]
    # A word naming a skipped file is drawn as text, as in A1111, and the result says so.
    noted = json.loads((spool.outbox / "skipped.json").read_text())
    assert noted["status"] == "succeeded" and "embeddings" not in noted["prompt"]
    assert [w.split(" was skipped")[0] for w in noted["warnings"]] == [
        f"prompt: evil is drawn as text: its embedding file {folder / 'evil.pt'}",
        f"negative_prompt: xl is drawn as text: its embedding file {folder / 'xl.safetensors'}"]
    assert "needs full unpickling" in noted["warnings"][0]
    # the infotext's TI hashes, for civitai: the prompt's, then the negative's (A1111's order)
    text = Image.open(spool.outbox / "emb.png").text["parameters"]
    assert f'TI hashes: "glow: {files["glow"].hash}, badhands: {files["badhands"].hash}, glow: {files["glow"].hash}"' \
        in text.splitlines()[-1]
    assert "TI hashes" not in Image.open(spool.outbox / "text.png").text["parameters"]

    # By hand: the tokens with each name's placeholders as spare vocabulary rows (the
    # byte-level tokenizer uses 514 of the 1000) holding its vectors; weights are all 1.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ensure_builtin(BUILTINS["tiny-random"], model_cache),
                                                             safety_checker=None)
    tokenizer, table = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight
    rows = {"glow": [600, 601, 602], "badhands": [610, 611]}
    with torch.no_grad():
        table[600:603] = vectors(3, 1)
        table[610:612] = vectors(2, 2)

    def by_hand(words: list[str]) -> torch.Tensor:
        ids = [tokenizer.bos_token_id]
        for word in words:
            ids += rows.get(word) or tokenizer(word, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] * (77 - len(ids))
        with torch.no_grad():
            return pipe.text_encoder(torch.tensor([ids])).last_hidden_state

    cond = by_hand(["a cat,", "glow", "on a mat"])
    uncond = by_hand(["badhands", ", blurry,", "glow"])
    row = result["sampler"]
    pipe.scheduler = getattr(diffusers, row["class"]).from_config(pipe.scheduler.config, **row["options"])
    params = result["params"]
    with torch.no_grad():
        image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=params["steps"],
                     guidance_scale=params["guidance_scale"], width=params["width"], height=params["height"],
                     generator=[torch.Generator("cpu").manual_seed(3)], output_type="pil").images[0]
    rendered = np.asarray(Image.open(spool.outbox / "emb.png"), dtype=int)
    assert np.abs(rendered - np.asarray(image, dtype=int)).max() <= 1
    # and it is not the image of the words as text
    assert np.abs(rendered - np.asarray(Image.open(spool.outbox / "text.png"), dtype=int)).max() > 10


def test_a_file_added_to_a_running_daemons_folder_is_used_by_the_next_job(
        tmp_path: Path, spool: Spool, start_daemon: Any) -> None:
    root = tmp_path / "embeddings"
    root.mkdir()
    daemon = start_daemon(spool, SBRENDER_EMBEDDINGS_DIR=str(root))
    spool.drop("before.json", {"prompt": "a cat, glow", "seed": 1})
    assert "embeddings" not in spool.result("before")["prompt"]
    save_file({"emb_params": vectors(3, 1)}, root / "glow.safetensors")
    spool.drop("after.json", {"prompt": "a cat, glow", "seed": 1})
    after = spool.result("after")
    assert after["status"] == "succeeded", after.get("error")
    assert [e["name"] for e in after["prompt"]["embeddings"]] == ["glow"]
    assert daemon.events("embeddings loaded")[-1]["names"] == ["glow"]


def test_models_gives_a_checkpoints_hash_and_judges_widths_by_its_config(
        folder: Path, tmp_path: Path, model_cache: Path) -> None:
    from ldm_checkpoint import write_checkpoint
    from sbrender.models import BUILTINS, ensure_builtin

    tiny = ensure_builtin(BUILTINS["tiny-random"], model_cache)
    checkpoint = write_checkpoint(tiny, tmp_path / "tiny-ckpt.safetensors")
    env = daemon_env(model_cache, SBRENDER_MODEL=str(checkpoint), SBRENDER_MODEL_CONFIG=str(tiny),
                     SBRENDER_EMBEDDINGS_DIR=str(folder), PYTHONPATH=no_torch(tmp_path))
    proc = sbrender("models", "--json", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = json.loads(proc.stdout)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert listing["model"]["items"] == [{"name": "tiny-ckpt", "kind": "checkpoint", "file": str(checkpoint),
                                          "hash": sha[:10], "sha256": sha}]
    items = {item["name"]: item for item in listing["embeddings"]["items"]}
    assert "problem" not in items["glow"]  # width 32, as model_config's text encoder
    assert items["sd15only"]["problem"].startswith("holds vectors of width 768, and this model's text encoder takes 32")
