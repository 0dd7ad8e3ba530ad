"""Model sources: which one a model setting names, and what a user is told when it is not there."""

from __future__ import annotations

from pathlib import Path

import pytest

from sbrender import models
from sbrender.errors import ModelError


@pytest.mark.parametrize("name", ["./models/sd15", "models/sd15/unet", "~/models/sd15", "owner/-name",
                                  "owner/na--me", "owner/name."])
def test_a_model_spelled_as_a_path_is_a_path(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError) as caught:
        models.resolve(name, tmp_path / "cache")
    assert caught.value.message == f"model {name} is a path, and {Path(name).expanduser().absolute()} does not exist"
    assert caught.value.hint and caught.value.hint.startswith("set model to the path of an existing diffusers")


@pytest.mark.parametrize("name", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4",
                                  "Lykon/dreamshaper-8", "some_one/model.v2"])
def test_a_repo_id_stays_a_repo_id(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Online, a repo id that is not cached is downloaded at the start: not an error here.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    assert models.resolve(name, tmp_path / "cache").to_dict()["source"] == "hub"
