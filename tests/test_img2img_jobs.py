"""img2img jobs: the fields, what a result records, the job-file cap, and the ways in
(job files, Client.submit, sbrender submit / validate), without a daemon."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from sbrender.cli import main
from sbrender.client import Client, validate_file
from sbrender.errors import JobError
from sbrender.forwarder import job_document
from sbrender.jobfile import read_bytes
from sbrender.jobs import BadJob, Job, Rules, build_job, parse_job_bytes
from sbrender.outputs import encode_png, infotext

from conftest import wait_for
from test_infotext import parse_generation_parameters

RULES = Rules()


def png(width: int = 48, height: int = 32, seed: int = 0) -> bytes:
    pixels = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, "PNG")
    return buf.getvalue()


PNG = png()
PNG64 = base64.b64encode(PNG).decode()
SHA = hashlib.sha256(PNG).hexdigest()


def job(**fields: Any) -> Job:
    return build_job("cat-42", {"prompt": "a cat", **fields}, RULES)


# --- the fields --------------------------------------------------------------------------

def test_an_img2img_job_holds_its_image_and_records_only_its_hash() -> None:
    got = job(init_image=PNG64, denoising_strength=0.6, resize_mode=1)
    assert got.init_image is not None and got.init_image.data == PNG
    assert (got.denoising_strength, got.resize_mode) == (0.6, 1)
    params = got.params()
    assert params["init_image"] == {"sha256": SHA, "width": 48, "height": 32, "format": "PNG", "bytes": len(PNG)}
    assert (params["denoising_strength"], params["resize_mode"]) == (0.6, 1)
    assert PNG64[:40] not in json.dumps(params)  # never the base64: results stay small


def test_img2img_defaults_are_a1111s_and_strength_is_an_alias() -> None:
    got = job(init_image=PNG64)
    assert (got.denoising_strength, got.resize_mode) == (0.75, 0)
    assert job(init_image=PNG64, strength=0.3).denoising_strength == 0.3
    with pytest.raises(JobError, match="both denoising_strength and its alias strength"):
        job(init_image=PNG64, strength=0.3, denoising_strength=0.4)


def test_a_txt2img_job_records_nothing_of_img2img() -> None:
    got = job()
    assert (got.init_image, got.denoising_strength, got.resize_mode, got.img2img_key) == (None, None, None, None)
    assert not {"init_image", "denoising_strength", "resize_mode"} & set(got.params())


@pytest.mark.parametrize("fields, field, message", [
    ({"denoising_strength": 0.5}, "denoising_strength", "denoising_strength is given without init_image"),
    ({"strength": 0.5}, "denoising_strength", "denoising_strength is given without init_image"),
    ({"resize_mode": 1}, "resize_mode", "resize_mode is given without init_image"),
    ({"init_image": None, "resize_mode": 1}, "resize_mode", "resize_mode is given without init_image"),
    ({"init_image": PNG64, "denoising_strength": 1.5}, "denoising_strength", "outside the allowed range 0 to 1"),
    ({"init_image": PNG64, "denoising_strength": "high"}, "denoising_strength", "must be a number"),
    ({"init_image": PNG64, "resize_mode": 3}, "resize_mode", "latent upscale"),
    ({"init_image": PNG64, "resize_mode": 7}, "resize_mode", "must be one of 0 (just resize), 1 (crop and resize)"),
    ({"init_image": "data:image/png;base64,AAAA"}, "init_image", "not an image"),
    ({"init_image": {"path": "cat.png"}}, "init_image", "must be a string of base64"),
])
def test_bad_img2img_fields_are_named(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(JobError) as caught:
        job(**fields)
    assert caught.value.field == field and message in str(caught.value)


def test_img2img_jobs_batch_when_they_run_the_same_steps() -> None:
    a = job(init_image=PNG64, denoising_strength=0.75, steps=20)
    b = job(init_image=base64.b64encode(png(seed=1)).decode(), denoising_strength=0.76, steps=20)
    c = job(init_image=PNG64, denoising_strength=0.5, steps=20)
    assert a.img2img_key == b.img2img_key  # both run A1111's 16 of 20 steps
    assert a.img2img_key != c.img2img_key
    assert job().img2img_key is None and a.img2img_key is not None


def test_a_batch_shares_one_decoded_image() -> None:
    data = json.dumps({"defaults": {"init_image": PNG64, "strength": 0.4},
                       "jobs": [{"prompt": "a"}, {"prompt": "b", "resize_mode": 2}]}).encode()
    first, second = parse_job_bytes("pair.json", data, RULES)
    assert isinstance(first, Job) and isinstance(second, Job)
    assert first.init_image is second.init_image
    assert (first.denoising_strength, second.resize_mode) == (0.4, 2)


def test_a_bad_init_image_fails_its_job_with_the_field_named() -> None:
    (entry,) = parse_job_bytes("gif.yaml", f"prompt: a\ninit_image: {base64.b64encode(b'GIF89a...').decode()}\n"
                               .encode(), RULES)
    assert isinstance(entry, BadJob)
    assert entry.error.to_dict() == {"type": "invalid_job", "field": "init_image",
                                     "message": "init_image is a GIF image; only PNG, JPEG or WebP images are "
                                                "accepted (convert it to PNG)"}


# --- the job-file cap ----------------------------------------------------------------------

SMALL = Rules(max_file_bytes=2048, max_image_bytes=64 * 1024)


def _file(tmp_path: Path, name: str, document: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document) if name.endswith(".json") else document)
    return path


def _read(path: Path, rules: Rules) -> list[Any]:
    return parse_job_bytes(path.name, read_bytes(path, rules.read_cap), rules)


def test_a_job_file_may_exceed_max_file_bytes_by_its_init_image(tmp_path: Path) -> None:
    image = png(120, 120, seed=2)  # about 43 KB, incompressible
    assert SMALL.max_file_bytes < len(image) <= SMALL.max_image_bytes
    text = base64.encodebytes(image).decode()  # wrapped every 76 characters, as base64(1) writes it
    yaml_text = "prompt: a cat\ninit_image: |\n" + "".join(f"  {line}\n" for line in text.splitlines())
    (entry,) = _read(_file(tmp_path, "wrapped.yaml", yaml_text), SMALL)
    assert isinstance(entry, Job) and entry.init_image is not None and entry.init_image.data == image
    (entry,) = _read(_file(tmp_path, "plain.json", {"prompt": "a cat", "init_image": base64.b64encode(image).decode()}),
                     SMALL)
    assert isinstance(entry, Job)


def test_the_rest_of_the_file_keeps_its_own_cap(tmp_path: Path) -> None:
    image64 = base64.b64encode(png(120, 120, seed=2)).decode()
    path = _file(tmp_path, "padded.json", {"prompt": "a cat", "init_image": image64, "metadata": {"x": "y" * 3000}})
    (entry,) = _read(path, SMALL)
    assert isinstance(entry, BadJob) and entry.error.kind == "unsafe_file"
    assert "besides its init image, more than the limit of 2048" in entry.error.message
    (entry,) = _read(_file(tmp_path, "junk.yaml", "prompt: " + "x" * 3000 + "\n"), SMALL)
    assert isinstance(entry, BadJob) and entry.error.kind == "unsafe_file"
    assert entry.error.message == "job file is 3009 bytes, more than the limit of 2048"


def test_a_file_past_the_read_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_bytes(b" " * (SMALL.read_cap + 1))
    (entry,) = validate_file(path, SMALL)
    assert isinstance(entry, BadJob) and entry.error.kind == "unsafe_file"
    assert f"more than the limit of {SMALL.read_cap}" in entry.error.message


def test_the_default_read_cap_holds_a_16_mib_image_wrapped_in_a_yaml_block() -> None:
    chars = 4 * -(-RULES.max_image_bytes // 3)
    wrapped = chars + (chars // 76 + 1) * 6  # four spaces and CRLF per 76-character line
    assert RULES.read_cap >= RULES.max_file_bytes + wrapped


def test_the_queue_document_of_a_forwarded_job_holds_the_image_itself() -> None:
    got = job(init_image="data:image/png;base64," + PNG64, strength=0.5)
    document = job_document(got)
    assert document["init_image"] == PNG64
    again = build_job("cat-42", document, RULES)
    assert again.init_image == got.init_image and again.params() == got.params()


# --- infotext -----------------------------------------------------------------------------

def _img2img_params(**extra: Any) -> dict[str, Any]:
    return {**job(init_image=PNG64, denoising_strength=0.6, steps=20, sampler="Euler a").params(), **extra}


def test_infotext_writes_the_denoising_strength_where_a1111_does() -> None:
    text = infotext(_img2img_params(clip_skip=2), 42, "dreamshaper_8", "879db523c3")
    assert text.endswith("Size: 512x512, Model hash: 879db523c3, Model: dreamshaper_8, Denoising strength: 0.6, "
                         "Clip skip: 2")
    assert parse_generation_parameters(text)["Denoising strength"] == "0.6"
    assert "Denoising strength" not in infotext(job().params(), 42, "m")


def test_sd_parsers_reads_the_denoising_strength() -> None:
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    data = encode_png(Image.new("RGB", (8, 8)), {"parameters": infotext(_img2img_params(), 7, "m", "879db523c3")})
    info = ParserManager().parse(Image.open(io.BytesIO(data)))
    assert info is not None and info.generator == Generators.AUTOMATIC1111
    assert info.metadata["Denoising strength"] == "0.6"
    (sampler,) = info.samplers
    assert (sampler.name, sampler.parameters["steps"]) == ("Euler a", "20")


# --- the ways in --------------------------------------------------------------------------------

@pytest.fixture
def client(tmp_path: Path) -> Client:
    for name in ("inbox", "outbox", "state"):
        (tmp_path / name).mkdir()
    return Client(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state")


@pytest.mark.parametrize("given", [
    pytest.param(lambda path: PNG, id="bytes"),
    pytest.param(lambda path: path, id="path"),
    pytest.param(lambda path: PNG64, id="base64"),
    pytest.param(lambda path: "data:image/png;base64," + PNG64, id="data-url"),
])
def test_client_submit_takes_bytes_a_path_or_base64(client: Client, tmp_path: Path, given: Any) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    job_id = client.submit("a cat", init_image=given(tmp_path / "cat.png"), denoising_strength=0.5)
    document = json.loads((client.inbox / f"{job_id}.json").read_text())
    assert base64.b64decode(document["init_image"]) == PNG and document["denoising_strength"] == 0.5
    shown = client.show(job_id)
    assert shown is not None and shown["params"]["init_image"]["sha256"] == SHA


def test_client_submit_refuses_a_symlink_and_writes_nothing(client: Client, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    os.symlink(tmp_path / "cat.png", tmp_path / "link.png")
    with pytest.raises(JobError, match="is a symbolic link"):
        client.submit("a cat", init_image=tmp_path / "link.png")
    with pytest.raises(JobError, match="not a file name or URL"):
        client.submit("a cat", init_image="cat.png")  # a str is base64; a path is a Path
    assert not os.listdir(client.inbox)


def _cli(tmp_path: Path, *args: str) -> Any:
    folders = ["--inbox", str(tmp_path / "inbox"), "--outbox", str(tmp_path / "outbox"),
               "--state", str(tmp_path / "state")]
    return CliRunner().invoke(main, [args[0], *folders, *args[1:]], catch_exceptions=False)


def test_sbrender_submit_init_image(client: Client, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    done = _cli(tmp_path, "submit", "a cat", "--init-image", str(tmp_path / "cat.png"), "--strength", "0.4",
                "--resize-mode", "2", "--id", "cat-img", "--json")
    assert done.exit_code == 0, done.output
    document = json.loads((client.inbox / "cat-img.json").read_text())
    assert base64.b64decode(document["init_image"]) == PNG
    assert (document["denoising_strength"], document["resize_mode"]) == (0.4, 2)
    done = _cli(tmp_path, "validate", str(client.inbox / "cat-img.json"), "--json")
    assert done.exit_code == 0, done.output
    (report,) = json.loads(done.output)
    assert report["params"]["init_image"]["sha256"] == SHA


@pytest.mark.parametrize("make, message", [
    (lambda p: os.symlink(p / "cat.png", p / "x.png"), "is a symbolic link (not followed)"),
    (lambda p: os.mkfifo(p / "x.png"), "is not a regular file"),
    (lambda p: (p / "x.png").write_text("just text\n"), "is not an image: it is text ('just text'...)"),
    (lambda p: (p / "x.png").write_bytes(PNG[:200]), "is a PNG image that is truncated or damaged"),
])
def test_sbrender_submit_refuses_a_bad_init_image_file(client: Client, tmp_path: Path, make: Any,
                                                       message: str) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    make(tmp_path)
    done = _cli(tmp_path, "submit", "a cat", "--init-image", str(tmp_path / "x.png"))
    assert done.exit_code == 1
    assert "job not submitted: init_image" in done.output and message in done.output
    assert not os.listdir(client.inbox)


def test_sbrender_submit_strength_without_an_image(client: Client, tmp_path: Path) -> None:
    done = _cli(tmp_path, "submit", "a cat", "--denoising-strength", "0.5")
    assert done.exit_code == 1 and "denoising_strength is given without init_image" in done.output


# --- on Redis -------------------------------------------------------------------------------------

def test_on_redis_the_queued_document_holds_the_image_and_a_daemon_gets_it(redis_server: Any, tmp_path: Path) -> None:
    """Client.submit and the inbox forwarder both queue the image itself (the job's
    document is its archive there); a daemon's broker takes the decoded image."""
    import threading

    from sbrender.config import load_settings
    from sbrender.forwarder import InboxForwarder
    from sbrender.redisbroker import RedisBroker
    from sbrender.redisqueue import RedisQueue
    from sbrender.renderer import call_key

    settings = load_settings(env={}, overrides={
        "queue": redis_server.url, "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "state": str(tmp_path / "state"), "watch.settle_seconds": 0.0})
    broker = RedisBroker(settings, threading.Event())
    broker.prepare()
    broker.open()
    queue = RedisQueue(redis_server.url)
    with Client.from_settings(settings) as client:
        client.submit("a cat", job_id="from-client", init_image=PNG, strength=0.5)
    (tmp_path / "inbox" / "from-file.json").write_text(json.dumps({"prompt": "a dog", "init_image": PNG64}))
    forwarder = InboxForwarder(settings, queue)
    forwarder.refresh()
    for job_id in ("from-client", "from-file"):
        found = queue.document(job_id)
        assert found is not None and found["job"]["init_image"] == PNG64
    taken = []
    for _ in range(2):
        def take() -> list[Any]:
            broker.refresh()
            return broker.take(1, call_key)
        (one,) = wait_for(take, 30, "nothing to take")
        taken.append(one.entry)
        assert broker.may_publish(one)
        broker.done(one, True, {"id": one.entry.id, "status": "succeeded", "params": one.entry.params()})
    assert sorted(e.id for e in taken) == ["from-client", "from-file"]
    assert all(isinstance(e, Job) and e.init_image is not None and e.init_image.sha256 == SHA for e in taken)
    assert (tmp_path / "state" / "done" / "from-file.json").exists()  # the file spool's archive, as forwarded
    broker._closing.set()
    queue.close()


def test_listing_queued_jobs_reads_image_headers_only(client: Client) -> None:
    """`sbrender jobs` reads every queued file each time: it checks an init image's header,
    size and hash, not its pixels; the daemon decodes them all and fails a truncated one."""
    truncated = base64.b64encode(png(64, 64, seed=9)[:3000]).decode()
    (client.inbox / "cut.json").write_text(json.dumps({"prompt": "a cat", "init_image": truncated}))
    (listed,) = client.jobs()
    assert (listed.id, listed.state, listed.error) == ("cut", "pending", None)
    (entry,) = validate_file(client.inbox / "cut.json", client.rules)
    assert isinstance(entry, BadJob) and "truncated or damaged" in entry.error.message


def test_client_submit_holds_the_rest_of_the_job_to_the_file_cap(tmp_path: Path) -> None:
    for name in ("inbox", "outbox", "state"):
        (tmp_path / name).mkdir(exist_ok=True)
    small = Client(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state", rules=SMALL)
    image = png(120, 120, seed=2)  # 43 KB: beyond max_file_bytes, within max_image_bytes
    assert small.submit("a cat", init_image=image)
    with pytest.raises(JobError, match="besides its init image, more than the limit of 2048"):
        small.submit("a cat", init_image=image, metadata={"notes": "n" * 3000})
    with pytest.raises(JobError, match="more than the limit of 2048"):
        small.submit("a cat", metadata={"notes": "n" * 3000})
    assert len(os.listdir(tmp_path / "inbox")) == 1
