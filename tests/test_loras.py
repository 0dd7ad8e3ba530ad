"""LoRAs as A1111 1.10 reads, merges and hashes them: the catalog and its names,
the tags and the loras field, the hash written by hand from the spec, a render
equal to A1111's merge ``W + m * (alpha/rank) * up @ down``, and end to end
through real ``sbrender`` processes on the tiny-random model, with kohya-format
files written here."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from conftest import Spool, daemon_env, sbrender
from sbrender import loras, prompts
from sbrender.errors import JobError
from sbrender.jobs import Rules, build_job
from sbrender.renderer import call_key

# kohya module names (A1111's and diffusers' SD1 naming) of the tiny-random model.
UNET_MODULES = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
                "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
                "up_blocks.0.attentions.0.proj_in")  # a 1x1 convolution
TE_MODULES = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
              "encoder.layers.0.self_attn.v_proj", "encoder.layers.0.self_attn.out_proj",
              "encoder.layers.1.mlp.fc1")


# --- files ---------------------------------------------------------------------------


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file written by hand from its spec (float32 and int tensors)."""
    import numpy as np

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for key, value in tensors.items():
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        data = array.tobytes()
        header[key] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def kohya_lora(model_cache: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> dict[str, Any]:
    """kohya-format tensors for some of the tiny model's UNet and text-encoder layers."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sbrender.models import BUILTINS, ensure_builtin

    folder = ensure_builtin(BUILTINS["tiny-random"], model_cache)
    unet = dict(UNet2DConditionModel.from_pretrained(folder / "unet").named_modules())
    te = dict(CLIPTextModel.from_pretrained(folder / "text_encoder").named_modules())
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for prefix, modules, names in (("lora_unet_", unet, UNET_MODULES), ("lora_te_text_model_", te, TE_MODULES)):
        for name in names:
            weight = modules[name].weight
            extra = (1, 1) if weight.dim() == 4 else ()
            key = prefix + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = 0.3 * torch.randn(rank, weight.shape[1], *extra, generator=gen)
            out[f"{key}.lora_up.weight"] = 0.3 * torch.randn(weight.shape[0], rank, *extra, generator=gen)
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def write_lora(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_bytes({k: v.numpy() for k, v in tensors.items()}, metadata))
    return path


def merge(model: Any, tensors: dict[str, Any], prefix: str, multiplier: float) -> None:
    """A1111's merge, written out: W += m * (alpha / rank) * up @ down, per layer."""
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in tensors:
            if not key.startswith(prefix) or not key.endswith(".lora_down.weight"):
                continue
            base = key[:-len(".lora_down.weight")]
            down, up = tensors[key], tensors[f"{base}.lora_up.weight"]
            scale = float(tensors[f"{base}.alpha"]) / down.shape[0]
            name = next(n for n in modules if n.replace(".", "_") == base[len(prefix):])
            weight = modules[name].weight
            weight += (multiplier * scale * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape)


# --- the catalog --------------------------------------------------------------------


def test_names_are_stems_and_unique_aliases_as_in_a1111(tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    write_lora(folder / "style" / "add_detail.safetensors", {}, {"ss_output_name": "detail_tweaker"})
    write_lora(folder / "a.safetensors", {}, {"ss_output_name": "shared"})
    write_lora(folder / "b.safetensors", {}, {"ss_output_name": "shared"})
    write_lora(folder / "c.safetensors", {}, {"ss_output_name": "a"})  # another file's stem: off
    (folder / "old.pt").write_bytes(b"pickle")
    (folder / ".partial.safetensors").write_bytes(b"")
    catalog = loras.scan(folder)
    assert catalog.names() == ["a", "add_detail", "b", "c", "detail_tweaker", "old"]
    assert catalog.lookup("detail_tweaker").path == folder / "style" / "add_detail.safetensors"
    assert catalog.lookup("add_detail").path == folder / "style" / "add_detail.safetensors"
    assert catalog.lookup("a").path == folder / "a.safetensors"
    with pytest.raises(JobError, match="unknown LoRA shared"):
        catalog.lookup("shared")
    with pytest.raises(JobError, match="unknown LoRA Add_Detail .*did you mean add_detail"):
        catalog.lookup("Add_Detail")  # exact and case-sensitive
    with pytest.raises(JobError, match=r"LoRA old cannot be used: old.pt is a pickle \(.pt\): loading it could run"):
        catalog.lookup("old")


def test_a_damaged_file_a_missing_folder_and_two_files_of_one_name_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    write_lora(folder / "x" / "twin.safetensors", {})
    write_lora(folder / "y" / "twin.safetensors", {})
    (folder / "cut.safetensors").write_bytes(struct.pack("<Q", 500) + b"{}")
    catalog = loras.scan(folder)
    with pytest.raises(JobError, match=r"LoRA twin is ambiguous: 2 files .*x/twin.safetensors, y/twin.safetensors"):
        catalog.lookup("twin")
    with pytest.raises(JobError, match="LoRA cut cannot be used: cut.safetensors is incomplete"):
        catalog.lookup("cut")
    # A whole header over cut tensor data: a download that stopped half way.
    whole = write_lora(folder / "half.safetensors", {"w": __import__("torch").zeros(64, 64)})
    whole.write_bytes(whole.read_bytes()[:-1000])
    with pytest.raises(JobError, match=r"LoRA half cannot be used: half.safetensors is incomplete or damaged: "
                                       r"\d+ bytes where its header says \d+ \(download it again\)"):
        loras.scan(folder).lookup("half")
    write_lora(folder / "xl.safetensors", {}, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(JobError, match=r"LoRA xl cannot be used: xl.safetensors was trained for another model "
                                       r"family \(sdxl_base_v1-0"):
        loras.scan(folder).lookup("xl")
    write_lora(folder / "v1.safetensors", {}, {"ss_base_model_version": "sd_v1"})
    assert loras.scan(folder).lookup("v1").problem == ""
    with pytest.raises(JobError, match=r"unknown LoRA x: loras_dir .*nowhere does not exist"):
        loras.scan(tmp_path / "nowhere").lookup("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match=r"unknown LoRA x: there are no LoRA files in .*empty"):
        loras.scan(tmp_path / "empty").lookup("x")


def test_the_hash_is_sshs_model_hash_else_the_sha256_after_the_header(tmp_path: Path) -> None:
    data = safetensors_bytes({"w": [[1.0, 2.0]]}, {"ss_output_name": "x"})
    (tmp_path / "plain.safetensors").write_bytes(data)
    length = struct.unpack("<Q", data[:8])[0]
    by_hand = hashlib.sha256(data[8 + length:]).hexdigest()
    catalog = loras.scan(tmp_path)
    cache = tmp_path / "cache"
    assert loras.short_hash(catalog.lookup("plain"), cache) == by_hand[:12]
    assert loras.file_sha256(tmp_path / "plain.safetensors", cache) == hashlib.sha256(data).hexdigest()
    own = "ABCDEF0123456789" * 4
    (tmp_path / "own.safetensors").write_bytes(safetensors_bytes({"w": [1.0]}, {"sshs_model_hash": own}))
    assert loras.short_hash(loras.scan(tmp_path).lookup("own"), cache) == own.lower()[:12]
    # Kept by path, size and mtime, next to the whole-file hash.
    stored = json.loads((cache / "model-hashes.json").read_text())[str(tmp_path / "plain.safetensors")]
    assert stored["addnet_sha256"] == by_hand and stored["sha256"] == hashlib.sha256(data).hexdigest()


# --- tags and the field ----------------------------------------------------------


@pytest.mark.parametrize("tag, te, unet", [
    ("<lora:x>", 1.0, 1.0),
    ("<lora:x:0.5>", 0.5, 0.5),
    ("<lora:x:0.5:0.2>", 0.5, 0.2),
    ("<lora:x:te=0.3>", 0.3, 0.3),
    ("<lora:x:unet=0.3>", 1.0, 0.3),
    ("<lora:x:0.7:te=0.3>", 0.3, 0.3),  # te= overrides, and unet follows the te in force
    ("<lora:x:-1.5:2>", -1.5, 2.0),
])
def test_tags_are_read_as_a1111_reads_them(tag: str, te: float, unet: float) -> None:
    job = build_job("j", {"prompt": f"a cat, {tag} on a mat"}, Rules())
    assert job.lora_set == (loras.LoraUse("x", te, unet),)
    assert job.prompt == f"a cat, {tag} on a mat"  # kept as written (the infotext shows it)
    assert prompts.parse(job.prompt).segments == (("a cat,  on a mat", 1.0),)


@pytest.mark.parametrize("job, message", [
    ({"prompt": "<lora:x:strong>"}, "prompt: the weight in <lora:x:strong> must be a number, not 'strong'"),
    ({"prompt": "<lora:x:nan>"}, "must be a finite number"),
    ({"prompt": "<lora:x:1:1:8>"}, "<lora:x:1:1:8> sets dyn, which is not supported"),
    ({"prompt": "<lora:x:1> <lora:x:0.5>"}, "LoRA x is asked for twice"),
    ({"prompt": "<lora:x:1>", "loras": {"x": 0.5}}, "LoRA x is asked for twice"),
    ({"prompt": "a", "loras": ["x"]}, "loras must be a mapping of LoRA names to weights"),
    ({"prompt": "a", "loras": {"x": "0.5"}}, "loras: the weight of x must be a number, not the string '0.5'"),
    ({"prompt": "a", "loras": {"x": {"tee": 1}}}, "mapping with te and/or unet, not tee"),
    ({"prompt": "a", "loras": {"x": {"te": "1"}}}, "loras: the weight of x must be a number, not the string '1'"),
    ({"prompt": "a", "loras": {"x": True}}, "loras: the weight of x must be a number, not True"),
    ({"prompt": "<hypernet:x:1>"}, "extra networks (hypernet) are not supported yet"),
])
def test_bad_tags_and_fields_are_refused_with_the_reason(job: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError) as caught:
        build_job("j", job, Rules())
    assert message in str(caught.value)


def test_the_field_adds_to_the_tags_and_is_recorded_as_given() -> None:
    job = build_job("j", {"prompt": "<lora:a:0.8> cat", "loras": {"b": 0.5, "c": {"te": 0.2, "unet": 0.9}}}, Rules())
    assert job.lora_set == (loras.LoraUse("a", 0.8, 0.8), loras.LoraUse("b", 0.5, 0.5), loras.LoraUse("c", 0.2, 0.9))
    assert job.params()["loras"] == {"b": 0.5, "c": {"te": 0.2, "unet": 0.9}}
    assert "loras" not in build_job("j", {"prompt": "<lora:a:0.8> cat"}, Rules()).params()
    # a tag in the negative prompt is text, as in A1111
    assert build_job("j", {"prompt": "a", "negative_prompt": "<lora:zz:1>"}, Rules()).lora_set == ()


def test_names_are_checked_against_the_catalog_when_one_is_known(tmp_path: Path) -> None:
    write_lora(tmp_path / "add_detail.safetensors", {}, {"ss_output_name": "detail"})
    rules = Rules(loras=loras.scan(tmp_path))
    build_job("j", {"prompt": "<lora:add_detail:1>", "loras": {}}, rules)
    with pytest.raises(JobError, match="unknown LoRA add_detial .*did you mean add_detail") as caught:
        build_job("j", {"prompt": "<lora:add_detial:1>"}, rules)
    assert caught.value.field == "prompt"
    with pytest.raises(JobError, match="unknown LoRA nope") as caught:
        build_job("j", {"prompt": "a", "loras": {"nope": 1}}, rules)
    assert caught.value.field == "loras"
    with pytest.raises(JobError, match=r"LoRA detail is asked for twice \(add_detail and detail are one file: a "
                                       r"name and its ss_output_name alias\)"):
        build_job("j", {"prompt": "<lora:add_detail:1>", "loras": {"detail": 1}}, rules)


def test_the_batch_key_separates_lora_sets() -> None:
    def key(prompt: str, **fields: Any) -> Any:
        return call_key(build_job("j", {"prompt": prompt, **fields}, Rules()))

    assert key("cat <lora:a:1>") == key("dog <lora:a:1>") == key("dog", loras={"a": 1})
    assert len({key("cat"), key("cat <lora:a:1>"), key("cat <lora:a:0.5>"), key("cat <lora:a:1:0.5>"),
                key("cat <lora:b:1>"), key("cat <lora:a:1> <lora:b:1>")}) == 6


def test_validate_refuses_an_unknown_lora_by_name(tmp_path: Path, model_cache: Path) -> None:
    folder = tmp_path / "loras"
    write_lora(folder / "add_detail.safetensors", {})
    (tmp_path / "bad.json").write_text(json.dumps({"prompt": "a cat <lora:add_detial:0.8>"}))
    (tmp_path / "field.json").write_text(json.dumps({"prompt": "a cat", "loras": {"Add_Detail": 1}}))
    (tmp_path / "good.json").write_text(json.dumps({"prompt": "a cat <lora:add_detail:0.8>"}))
    proc = sbrender("validate", str(tmp_path / "bad.json"), str(tmp_path / "field.json"), str(tmp_path / "good.json"),
                    env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder)), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "bad: invalid: unknown LoRA add_detial in " in lines[0] and "did you mean add_detail?" in lines[0]
    assert "field: invalid: unknown LoRA Add_Detail" in lines[1]
    assert lines[2].endswith("good: ok")


# --- rendering ------------------------------------------------------------------------


def renderer(model_cache: Path, tmp_path: Path, folder: Path, dtype: str = "float32") -> Any:
    from sbrender.config import load_settings
    from sbrender.pipeline import DiffusersRenderer

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    settings = load_settings(empty, env={}, overrides={
        "model": "tiny-random", "cache": str(model_cache), "offline": True, "device": "cpu", "dtype": dtype,
        "loras_dir": str(folder), "loras_cache": 2})
    r = DiffusersRenderer(settings)
    r.load()
    return r


def run(r: Any, job: Any) -> tuple[Any, Any, Any]:
    """The conditioning, final latents and pixels (float32) of one image of ``job``."""
    import torch

    r._use_sampler(job.sampler, job.scheduler)
    r._use_loras(job)
    with torch.inference_mode():
        schedule, _ = r._conditioning([(job, [job.seed])])
        cond = schedule.at(0)  # no prompt editing here: one conditioning for every step

        def call(kind: str) -> Any:
            return r.pipe(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, output_type=kind,
                          num_inference_steps=job.steps, guidance_scale=job.guidance_scale, width=job.width,
                          height=job.height, generator=torch.Generator().manual_seed(job.seed)).images

        return cond, call("latent"), torch.as_tensor(call("np"))


def test_a_lora_render_equals_a1111s_merge(tmp_path: Path, model_cache: Path) -> None:
    """te 0.7 and unet -0.4: the conditioning (prompt and negative) and the pixels
    equal those of the same model with each layer merged by hand, to 1e-5 (the
    final latents to 1e-5 of their size); and they differ from the model without it."""
    import torch

    folder = tmp_path / "loras"
    tensors = kohya_lora(model_cache, seed=1)
    write_lora(folder / "style.safetensors", tensors)
    fields = {"negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 11, "sampler": "Euler"}
    tagged = build_job("t", {"prompt": "a lighthouse <lora:style:0.7:-0.4>at dusk", **fields}, Rules())
    plain = build_job("p", {"prompt": "a lighthouse at dusk", **fields}, Rules())  # the same text, tag removed

    with_lora = renderer(model_cache, tmp_path, folder)
    ours = run(with_lora, tagged)
    base = run(with_lora, plain)  # the same renderer, its adapters now off
    merged = renderer(model_cache, tmp_path, folder)
    merge(merged.pipe.unet, tensors, "lora_unet_", -0.4)
    merge(merged._text_encoder, tensors, "lora_te_text_model_", 0.7)
    theirs = run(merged, plain)

    for name, a, b in (("cond", ours[0].cond, theirs[0].cond), ("uncond", ours[0].uncond, theirs[0].uncond),
                       ("pixels", ours[2], theirs[2])):
        assert (a - b).abs().max() <= 1e-5, name
    # The latents end about 50 in size (sigmas): 1e-5 of that (float32 sums in another order).
    assert (ours[1] - theirs[1]).abs().max() <= 1e-5 * theirs[1].abs().max()
    assert (ours[0].cond - base[0].cond).abs().max() > 1e-3  # the TE LoRA changed the prompt...
    assert (ours[0].uncond - base[0].uncond).abs().max() > 1e-3  # ...and the negative
    assert (ours[1] - base[1]).abs().max() > 1e-3
    # The unet weight alone reaches the UNet: te 0 leaves the conditioning as it was.
    unet_only = run(with_lora, build_job("u", {"prompt": "a lighthouse <lora:style:0:-0.4>at dusk", **fields},
                                         Rules()))
    torch.testing.assert_close(unet_only[0].cond, base[0].cond, rtol=0, atol=0)
    assert (unet_only[1] - base[1]).abs().max() > 1e-3


def test_switching_sets_and_back_to_none_is_exact_and_the_cache_is_bounded(tmp_path: Path,
                                                                            model_cache: Path) -> None:
    """After LoRA jobs, a job without renders bit for bit as on a renderer that
    never loaded one; loaded adapters stay within loras_cache (2 here)."""
    import torch

    folder = tmp_path / "loras"
    for k in range(3):
        write_lora(folder / f"l{k}.safetensors", kohya_lora(model_cache, seed=10 + k))
    fields = {"steps": 2, "width": 64, "height": 64, "seed": 4, "sampler": "Euler"}
    r = renderer(model_cache, tmp_path, folder)
    first = run(r, build_job("a", {"prompt": "a cat <lora:l0:0.5> <lora:l1:1>", **fields}, Rules()))
    run(r, build_job("b", {"prompt": "a cat <lora:l2:1>", **fields}, Rules()))
    assert len(r._adapters.loaded) == 2
    again = run(r, build_job("a", {"prompt": "a cat <lora:l0:0.5> <lora:l1:1>", **fields}, Rules()))
    torch.testing.assert_close(again[1], first[1], rtol=0, atol=0)
    after = run(r, build_job("n", {"prompt": "a cat", **fields}, Rules()))
    clean = run(renderer(model_cache, tmp_path, tmp_path / "none"), build_job("n", {"prompt": "a cat", **fields},
                                                                            Rules()))
    for a, b in zip(after[1:], clean[1:]):
        assert torch.equal(a, b)
    assert torch.equal(after[0].cond, clean[0].cond)
    # ...with the pipeline's own layers in place: no idle LoRA wrapper costs it time.
    from peft.tuners.lora import LoraLayer

    assert not [m for model in (r.pipe.unet, r._text_encoder) for m in model.modules() if isinstance(m, LoraLayer)]


def test_a_file_added_or_replaced_while_running_is_picked_up(tmp_path: Path, model_cache: Path) -> None:
    """No restart: a name unknown at first is found once its file is there; a
    file replaced in place (new size or mtime) is loaded afresh."""
    import os

    folder = tmp_path / "loras"
    folder.mkdir()
    r = renderer(model_cache, tmp_path, folder)
    job = build_job("j", {"prompt": "a cat <lora:late:1>", "steps": 2, "width": 64, "height": 64, "seed": 1}, Rules())
    with pytest.raises(JobError, match="unknown LoRA late: there are no LoRA files in "):
        r._use_loras(job)
    path = write_lora(folder / "late.safetensors", kohya_lora(model_cache, seed=8))
    first = r._use_loras(job)
    assert r._use_loras(job) == first  # loaded once
    write_lora(path, kohya_lora(model_cache, seed=9))
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)
    second = r._use_loras(job)
    assert second[0]["sha256"] != first[0]["sha256"] and second[0]["hash"] != first[0]["hash"]
    assert len(r._adapters.loaded) == 2  # the old one goes when loras_cache (2) needs its place


def test_in_half_precision_the_text_encoder_layers_go_to_the_float32_encoder(tmp_path: Path,
                                                                            model_cache: Path) -> None:
    """The pipeline's own half-precision text encoder is never run (it gets
    prompt_embeds): it gets no adapter; the float32 copy that encodes does."""
    import torch

    folder = tmp_path / "loras"
    write_lora(folder / "style.safetensors", kohya_lora(model_cache, seed=2))
    r = renderer(model_cache, tmp_path, folder, dtype="bfloat16")
    job = build_job("j", {"prompt": "a cat <lora:style:0.5>", "steps": 2, "width": 64, "height": 64, "seed": 1},
                    Rules())
    out = r.render(job, [1])
    assert [x["name"] for x in out.prompt["loras"]] == ["style"]
    assert r.pipe.text_encoder is not r._text_encoder and not getattr(r.pipe.text_encoder, "peft_config", None)
    assert {p.dtype for n, p in r._text_encoder.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in r.pipe.unet.named_parameters() if "lora_" in n} == {torch.bfloat16}


def test_the_prompt_cache_tells_text_encoder_loras_apart(tmp_path: Path, model_cache: Path) -> None:
    """One text ("a cat"), with the loras field at te 0.5, at te 1, with unet only,
    and without: each encoded under the text encoder's own LoRA state."""
    import torch

    folder = tmp_path / "loras"
    write_lora(folder / "style.safetensors", kohya_lora(model_cache, seed=4))
    r = renderer(model_cache, tmp_path, folder)

    def cond(loras: dict[str, Any] | None) -> Any:
        job = build_job("j", {"prompt": "a cat", "loras": loras}, Rules())
        r._use_loras(job)
        with torch.inference_mode():
            return r._conditioning([(job, [1])])[0].at(0).cond.clone()

    none, half, full = cond(None), cond({"style": 0.5}), cond({"style": 1})
    unet_only = cond({"style": {"te": 0, "unet": 1}})
    assert (half - none).abs().max() > 1e-3 and (full - half).abs().max() > 1e-3
    assert torch.equal(cond({"style": 0.5}), half) and torch.equal(cond(None), none)
    assert torch.equal(unet_only, none)  # te 0: the encoder as without the LoRA (to the bit)


def test_a_file_that_fails_to_load_leaves_no_adapter_behind(tmp_path: Path, model_cache: Path) -> None:
    """Its UNet layers load, its text-encoder layers do not fit: nothing of it stays."""
    from sbrender.errors import RenderError

    folder = tmp_path / "loras"
    tensors = kohya_lora(model_cache, seed=3)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    tensors[key] = tensors[key][:-1]  # one row short: the text encoder refuses it
    write_lora(folder / "broken.safetensors", tensors)
    write_lora(folder / "lycoris.safetensors", {"lora_unet_x.hada_w1_a": tensors[key]})
    r = renderer(model_cache, tmp_path, folder)
    job = build_job("b", {"prompt": "a cat <lora:broken:1>", "steps": 2, "width": 64, "height": 64, "seed": 1},
                    Rules())
    with pytest.raises(RenderError, match=r"cannot load LoRA broken \(.*broken.safetensors\): "):
        r._use_loras(job)
    with pytest.raises(RenderError, match="unsupported layer 'lora_unet_x.hada_w1_a' .*LyCORIS"):
        r._use_loras(build_job("l", {"prompt": "<lora:lycoris:1>"}, Rules()))
    for model in (r.pipe.unet, r._text_encoder):
        assert not getattr(model, "peft_config", None)
        assert not [n for n, _ in model.named_parameters() if "lora" in n]
    assert r._adapters.loaded == []


# --- end to end --------------------------------------------------------------------


def test_a_daemon_renders_loras_records_them_and_a_broken_one_fails_alone(tmp_path: Path,
                                                                         model_cache: Path) -> None:
    """One `sbrender run --once`: a LoRA job, a broken LoRA, an unknown name, then a
    job without LoRAs whose PNG is byte for byte a clean daemon's."""
    folder = tmp_path / "loras"
    write_lora(folder / "style.safetensors", kohya_lora(model_cache, seed=5), {"ss_output_name": "my_style"})
    broken = kohya_lora(model_cache, seed=6)
    key = "lora_unet_up_blocks_0_attentions_0_proj_in.lora_down.weight"
    broken[key] = broken[key][:, :-1]
    write_lora(folder / "broken.safetensors", broken)
    plain = {"prompt": "a cat on a mat", "seed": 3}
    spool = Spool(tmp_path / "spool")
    # Dropped in this order, rendered in this order (first come, first served).
    for k, (name, job) in enumerate([("unknown", {"prompt": "a cat", "seed": 3, "loras": {"style_nope": 1}}),
                                     ("lora", {"prompt": "a cat <lora:my_style:0.8:0.5>", "seed": 3}),
                                     ("field", {"prompt": "a cat", "seed": 3, "loras": {"style": {"te": 0.8}}}),
                                     ("broken", {"prompt": "a cat <lora:broken:1>", "seed": 3}),
                                     ("after", plain)]):
        spool.drop(f"{name}.json", job, mtime=1_700_000_000 + k)
    proc = sbrender("run", "--once", *spool.cli_args(), cwd=spool.root,
                    env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = ("unknown", "lora", "field", "broken", "after")
    result = {n: json.loads((spool.outbox / f"{n}.json").read_text()) for n in names}
    assert result["unknown"]["status"] == "failed"
    assert result["unknown"]["error"]["type"] == "invalid_job"
    assert "unknown LoRA style_nope" in result["unknown"]["error"]["message"]
    assert "did you mean style?" in result["unknown"]["error"]["message"]
    assert result["lora"]["status"] == "succeeded", result["lora"].get("error")
    assert [(x["name"], x["te"], x["unet"]) for x in result["lora"]["prompt"]["loras"]] == [("my_style", 0.8, 0.5)]
    assert result["field"]["status"] == "succeeded", result["field"].get("error")
    data = (folder / "style.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    assert result["field"]["prompt"]["loras"] == [{
        "name": "style", "te": 0.8, "unet": 0.8, "hash": hashlib.sha256(data[8 + length:]).hexdigest()[:12],
        "sha256": hashlib.sha256(data).hexdigest()}]
    assert result["field"]["params"]["loras"] == {"style": 0.8}
    assert result["broken"]["status"] == "failed"
    assert result["broken"]["error"]["type"] == "render"
    assert "cannot load LoRA broken" in result["broken"]["error"]["message"]
    assert result["after"]["status"] == "succeeded" and "loras" not in result["after"]["prompt"]

    clean = Spool(tmp_path / "clean")
    clean.drop("after.json", plain)
    proc = sbrender("run", "--once", *clean.cli_args(), cwd=clean.root, env=daemon_env(model_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from PIL import Image

    ours, theirs = Image.open(spool.outbox / "after.png"), Image.open(clean.outbox / "after.png")
    assert ours.tobytes() == theirs.tobytes()
    assert Image.open(spool.outbox / "field.png").tobytes() != theirs.tobytes()
    assert Image.open(spool.outbox / "lora.png").tobytes() != Image.open(spool.outbox / "field.png").tobytes()
    text = Image.open(spool.outbox / "lora.png").text["parameters"]
    short = hashlib.sha256(data[8 + length:]).hexdigest()[:12]
    assert text.startswith("a cat <lora:my_style:0.8:0.5>\n") and f'Lora hashes: "my_style: {short}"' in text
    # A LoRA of the loras field joins the infotext's prompt as a tag: A1111 renders it from PNG Info too.
    assert Image.open(spool.outbox / "field.png").text["parameters"].startswith("a cat <lora:style:0.8>\n")


def test_jobs_share_a_batch_only_with_the_same_lora_set(tmp_path: Path, model_cache: Path) -> None:
    """perf.batch_size 4: two jobs of one set render in one call, as they render
    alone; a job of another set, and one without, render in calls of their own."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "loras"
    write_lora(folder / "style.safetensors", kohya_lora(model_cache, seed=7))
    jobs = {"a1": {"prompt": "a cat <lora:style:0.6>", "seed": 1},
            "a2": {"prompt": "a dog <lora:style:0.6>", "seed": 2},
            "b": {"prompt": "a cat <lora:style:0.9>", "seed": 1}, "none": {"prompt": "a cat", "seed": 1}}
    images = {}
    for batch in (1, 4):
        spool = Spool(tmp_path / f"b{batch}")
        for k, (name, job) in enumerate(jobs.items()):
            spool.drop(f"{name}.json", job, mtime=1_700_000_000 + k)
        proc = sbrender("run", "--once", *spool.cli_args(), cwd=spool.root,
                        env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder),
                                       SBRENDER_PERF_BATCH_SIZE=str(batch)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = {n: json.loads((spool.outbox / f"{n}.json").read_text()) for n in jobs}
        assert all(r["status"] == "succeeded" for r in result.values())
        if batch > 1:
            assert result["a1"]["batch"]["jobs"] == result["a2"]["batch"]["jobs"] == ["a1", "a2"]
            assert "batch" not in result["b"] and "batch" not in result["none"]
        images[batch] = {n: np.asarray(Image.open(spool.outbox / f"{n}.png"), dtype=int) for n in jobs}
    for name in jobs:
        assert np.abs(images[1][name] - images[4][name]).max() <= 2, name
    assert np.abs(images[1]["a1"] - images[1]["b"]).max() > 2  # the weight shows


def test_models_lists_the_loras_with_aliases_and_hashes(tmp_path: Path, model_cache: Path) -> None:
    folder = tmp_path / "loras"
    plain = write_lora(folder / "add_detail.safetensors", {})
    write_lora(folder / "styles" / "v2_final.safetensors", {}, {"ss_output_name": "inkwash"})
    (folder / "old.pt").write_bytes(b"not read")
    proc = sbrender("models", "--json", env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = json.loads(proc.stdout)["loras"]
    assert listing["source"] == str(folder)
    items = {item["name"]: item for item in listing["items"]}
    assert items["add_detail"]["hash"] == loras.short_hash(loras.scan(folder).lookup("add_detail"), model_cache)
    assert items["add_detail"]["file"] == str(plain)
    assert items["v2_final"]["alias"] == "inkwash" and len(items["v2_final"]["hash"]) == 12
    assert "pickle" in items["old"]["problem"]
    text = sbrender("models", env=daemon_env(model_cache, SBRENDER_LORAS_DIR=str(folder)), cwd=tmp_path).stdout
    assert f"loras ({folder})" in text and "inkwash" in text


def test_a_long_lived_catalog_sees_files_added_and_replaced(tmp_path: Path) -> None:
    """A Redis daemon's or a Django client's rules keep one catalog: a file added
    later is found, and one replaced in place is described afresh (hash, alias)."""
    folder = tmp_path / "loras"
    write_lora(folder / "first.safetensors", {})
    catalog = loras.scan(folder)
    assert catalog.lookup("first").name == "first"
    write_lora(folder / "later.safetensors", {}, {"sshs_model_hash": "a" * 64})
    assert catalog.lookup("later").sshs_hash == "a" * 64
    import os
    later = folder / "later.safetensors"
    write_lora(later, {}, {"sshs_model_hash": "b" * 64, "ss_output_name": "renamed"})
    os.utime(later, ns=(later.stat().st_atime_ns, later.stat().st_mtime_ns + 10**9))
    assert catalog.lookup("later").sshs_hash == "b" * 64
    with pytest.raises(JobError, match="unknown LoRA never"):
        catalog.lookup("never")
