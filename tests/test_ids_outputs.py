"""Job ids (the only thing output names are made from) and publishing outputs safely."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sbrender import ids
from sbrender.errors import SpoolError
from sbrender.outputs import (Publication, atomic_write, commit, encode_png, image_names, infotext, read_json,
                              write_json)

# --- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a", "7", "cat-42", "Cat_42.v2", "job-20260101-120000-abc123", "x" * 128])
def test_valid_ids(text: str) -> None:
    assert ids.id_problem(text) is None
    assert ids.is_valid_id(text)


@pytest.mark.parametrize("text, problem", [
    ("", "a job id must not be empty"),
    ("x" * 129, "a job id has at most 128 characters, this one has 129"),
    ("-cat", "a job id must start with a letter or a digit"),
    (".cat", "a job id must start with a letter or a digit"),
    ("_cat", "a job id must start with a letter or a digit"),
    ("été", "a job id must start with a letter or a digit"),
    ("٣cat", "a job id must start with a letter or a digit"),  # an Arabic-Indic digit
    ("cat 42", "a job id may hold only letters, digits, '.', '_' and '-'"),
    ("cat/../../etc", "a job id may hold only letters, digits, '.', '_' and '-'"),
    ("cat\x00", "a job id may hold only letters, digits, '.', '_' and '-'"),
    ("caté", "a job id may hold only letters, digits, '.', '_' and '-'"),
    ("cat:42", "a job id may hold only letters, digits, '.', '_' and '-'"),
    ("cat\n", "a job id may hold only letters, digits, '.', '_' and '-'"),
])
def test_invalid_ids_say_why(text: str, problem: str) -> None:
    assert ids.id_problem(text) == problem
    assert not ids.is_valid_id(text)


@pytest.mark.parametrize("name", ["cat.yaml", "cat.yml", "cat.json", "CAT.YAML", "cat.v2.json", "-odd name.yaml"])
def test_job_file_names(name: str) -> None:
    assert ids.is_job_file_name(name)


@pytest.mark.parametrize("name", [".cat.yaml", ".hidden", "cat.yaml.tmp", ".cat.yaml.1234.tmp", "cat.json.part",
                                  "cat.txt", "cat.yaml~", "cat.yaml.swp", "cat", "cat.png", "cat.json.bak"])
def test_names_that_are_not_job_files(name: str) -> None:
    assert not ids.is_job_file_name(name)


HOSTILE_NAMES = ["my cat.yaml", "my_cat.yaml.yaml", "my?cat.yaml", "my*cat.yaml", "-cat.yaml", "--.yaml", ".yaml",
                 "..yaml", "ünïcödé.json", "猫.yaml", "\udcff\udcfe.yaml", "a\nb.yaml", "x" * 255,
                 "y" * 251 + ".yml", "$(rm -rf ~).json", "cat.yaml", "-"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_safe_id_for_is_always_a_valid_stable_id(name: str) -> None:
    safe = ids.safe_id_for(name)
    assert ids.id_problem(safe) is None, safe
    assert safe == ids.safe_id_for(name)
    assert safe.startswith("invalid-")


def test_safe_ids_of_distinct_names_are_distinct() -> None:
    safe = [ids.safe_id_for(name) for name in HOSTILE_NAMES]
    assert len(set(safe)) == len(HOSTILE_NAMES)
    # Names that clean up to the same text are kept apart too.
    assert ids.safe_id_for("my cat.yaml") != ids.safe_id_for("my?cat.yaml")


def test_a_safe_id_keeps_what_it_can_of_the_name() -> None:
    assert ids.safe_id_for("my cat.yaml").startswith("invalid-my_cat-")


@pytest.mark.parametrize("index, total, expected", [(0, 1, "b-001"), (1, 3, "b-002"), (0, 1000, "b-0001"),
                                                    (999, 1000, "b-1000"), (11, 12, "b-012")])
def test_batch_ids(index: int, total: int, expected: str) -> None:
    assert ids.batch_id("b", index, total) == expected


def test_new_ids_are_valid_and_distinct() -> None:
    made = {ids.new_id() for _ in range(50)}
    assert len(made) == 50
    assert all(ids.id_problem(i) is None and i.startswith("job-") for i in made)


# --- atomic writes ------------------------------------------------------------------------


def test_atomic_write_leaves_only_the_final_file(tmp_path: Path) -> None:
    path = atomic_write(tmp_path, "cat-42.json", b'{"ok": true}\n')
    assert path == tmp_path / "cat-42.json"
    assert path.read_bytes() == b'{"ok": true}\n'
    assert os.listdir(tmp_path) == ["cat-42.json"]


def test_atomic_write_replaces_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "cat.json").write_bytes(b"old content that is longer than the new one")
    atomic_write(tmp_path, "cat.json", b"new")
    assert (tmp_path / "cat.json").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["cat.json"]


@pytest.mark.parametrize("name", ["a/b.json", "../escape.json", ".hidden.json", ".", "..", "a\x00b.json"])
def test_atomic_write_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(SpoolError, match="refusing to write unsafe file name"):
        atomic_write(folder, name, b"data")
    assert list(tmp_path.rglob("*")) == [folder]


def test_atomic_write_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (outbox / "cat.json").symlink_to(victim)
    atomic_write(outbox, "cat.json", b"result")
    assert victim.read_bytes() == b"precious"
    assert not (outbox / "cat.json").is_symlink()
    assert (outbox / "cat.json").read_bytes() == b"result"
    assert os.listdir(outbox) == ["cat.json"]


def test_atomic_write_into_a_missing_folder_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="cannot write") as info:
        atomic_write(tmp_path / "gone", "cat.json", b"x")
    assert "check free space and permissions" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_json_results_round_trip(tmp_path: Path) -> None:
    data = {"id": "cat", "prompt": "un chat, été", "images": [{"seed": 1}]}
    path = write_json(tmp_path, "cat.json", data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert "été" in path.read_text(encoding="utf-8")  # readable, not \\u-escaped
    assert read_json(path) == data


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"[1, 2]", b'"text"'])
def test_read_json_gives_none_for_a_missing_or_unusable_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    assert read_json(path) is None


# --- images -------------------------------------------------------------------------------


def test_image_names() -> None:
    assert image_names("cat", 1) == ["cat.png"]
    assert image_names("cat", 3) == ["cat-1.png", "cat-2.png", "cat-3.png"]


PARAMS: dict[str, Any] = {"prompt": "a cat, on a mat: oil painting", "negative_prompt": "", "steps": 4,
                          "sampler": "DPM++ 2M", "scheduler": "Karras", "guidance_scale": 7.0, "width": 64,
                          "height": 64}


def test_infotext_without_a_negative_prompt() -> None:
    assert infotext(PARAMS, 42, "tiny-random") == (
        "a cat, on a mat: oil painting\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 64x64, Model: tiny-random")


def test_infotext_with_a_negative_prompt() -> None:
    params = {**PARAMS, "negative_prompt": "blurry, low quality", "guidance_scale": 7.5, "width": 512,
              "height": 768}
    assert infotext(params, 3, "tiny-random") == (
        "a cat, on a mat: oil painting\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 512x768, Model: tiny-random")


@pytest.mark.parametrize("model, written", [
    ("org/model", "org/model"),
    ("/models/sd, v1", '"/models/sd, v1"'),
    ("C:/models/sd", '"C:/models/sd"'),
    ("modèle:ä", '"modèle:ä"'),  # as A1111's quote(): JSON, but non-ASCII kept
])
def test_infotext_quotes_values_holding_a_comma_or_colon(model: str, written: str) -> None:
    assert infotext(PARAMS, 42, model).endswith(f", Model: {written}")


def test_infotext_keeps_a_multiline_prompt_as_it_is() -> None:
    text = infotext({**PARAMS, "prompt": "line one\nline two"}, 1, "m")
    assert text.startswith("line one\nline two\nSteps: 4, ")


@pytest.mark.parametrize("text", ["a cat\nSteps: 4, Seed: 42", "un chat sur un tapis, été, 猫"])
def test_png_carries_the_parameters_chunk(tmp_path: Path, text: str) -> None:
    image = Image.new("RGB", (16, 8), (200, 30, 30))
    path = tmp_path / "cat.png"
    path.write_bytes(encode_png(image, {"parameters": text}))
    with Image.open(path) as read:
        assert read.format == "PNG"
        assert read.size == (16, 8)
        assert read.text["parameters"] == text
        assert read.convert("RGB").getpixel((0, 0)) == (200, 30, 30)


def _pub(name: str, files: list[tuple[str, bytes]]) -> Publication:
    return Publication(f"{name}.json", files, lambda seconds: {"id": name, "status": "succeeded", "files":
                                                               [f for f, _ in files]},
                       lambda err: {"id": name, "status": "failed", "error": str(err)})


def test_commit_publishes_a_group_images_first_and_leaves_no_temp_files(tmp_path: Path) -> None:
    pngs = [encode_png(Image.new("RGB", (8, 8), (k, k, k)), {"parameters": f"image {k}"}) for k in range(3)]
    pubs = [_pub("cat", [("cat-1.png", pngs[0]), ("cat-2.png", pngs[1])]), _pub("dog", [("dog.png", pngs[2])]),
            _pub("bad", [])]
    out = commit(tmp_path, pubs)
    assert [r["status"] for r in out] == ["succeeded"] * 3
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "cat-1.png", "cat-2.png", "cat.json", "dog.json", "dog.png"]
    assert (tmp_path / "cat-2.png").read_bytes() == pngs[1]
    assert json.loads((tmp_path / "dog.json").read_text()) == {"id": "dog", "status": "succeeded",
                                                               "files": ["dog.png"]}


def test_commit_fails_only_the_job_whose_images_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    pubs = [_pub("ok", [("ok.png", b"png")]), _pub("evil", [("../escape.png", b"png")])]
    out = commit(tmp_path, pubs)
    assert out[0] is not None and out[0]["status"] == "succeeded"
    assert out[1] is not None and out[1]["status"] == "failed" and "unsafe file name" in out[1]["error"]
    assert sorted(os.listdir(tmp_path)) == ["evil.json", "ok.json", "ok.png", "sub"]


def test_commit_into_a_folder_that_is_gone_publishes_nothing(tmp_path: Path) -> None:
    assert commit(tmp_path / "gone", [_pub("cat", [("cat.png", b"png")])]) == [None]
