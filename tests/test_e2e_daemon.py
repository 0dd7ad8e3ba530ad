"""End to end: a real `sbrender run` process on the tiny-random model, fed through
the inbox as a person, a script or a web app would feed it.

One live daemon per watch strategy (inotify, polling) serves the tests of this
module; each test uses its own job ids.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from conftest import DaemonProcess, Spool, daemon_env, sbrender, wait_for
from sbrender.client import Client

# The tests share the module's two live daemons: under pytest-xdist, on one worker.
pytestmark = pytest.mark.xdist_group("live-daemons")

@pytest.fixture(scope="module", params=["inotify", "polling"])
def live(request: pytest.FixtureRequest, model_cache: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Spool, DaemonProcess]]:
    spool = Spool(tmp_path_factory.mktemp(f"live-{request.param}"))
    # "busy" steps slowly (2 s a step), so the cancel test catches it mid-render.
    daemon = DaemonProcess(spool, daemon_env(model_cache, SBRENDER_TEST_FAULTS="busy=slow,tty-job=slow"),
                           "--watch", request.param)
    daemon.wait_ready()
    yield spool, daemon
    code = daemon.stop()
    assert code == 0, daemon.log_path.read_text()[-4000:]
    assert daemon.events("stopped"), "no clean-stop log line"


def _check_images(spool: Spool, result: dict) -> list[Image.Image]:
    images = []
    for item in result["images"]:
        data = (spool.outbox / item["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item["sha256"]
        image = Image.open(spool.outbox / item["file"])
        assert image.size == (item["width"], item["height"])
        images.append(image)
    return images


def test_yaml_job_renders_png_and_metadata(live: tuple[Spool, DaemonProcess]) -> None:
    spool, daemon = live
    spool.drop("cat-yaml.yaml", "prompt: a cat on a mat\nnegative_prompt: blurry\nsteps: 4\n"
                                "width: 64\nheight: 72\nseed: 42\nsampler: Euler a\n"
                                "metadata: {django_pk: 17, tags: [a, b]}\n")
    result = spool.result("cat-yaml")
    assert result["status"] == "succeeded", result
    assert result["id"] == "cat-yaml"
    assert result["params"] == {"prompt": "a cat on a mat", "negative_prompt": "blurry", "steps": 4,
                                "guidance_scale": 7.0, "width": 64, "height": 72, "seed": 42, "count": 1,
                                "sampler": "Euler a", "scheduler": "Automatic", "priority": 0,
                                "clip_skip": 1}
    assert result["sampler"]["class"] == "EulerAncestralDiscreteScheduler"
    assert result["metadata"] == {"django_pk": 17, "tags": ["a", "b"]}
    assert result["model"]["name"] == "tiny-random" and result["model"]["random_weights"] is True
    assert "random weights" in result["model"]["note"]
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert {"torch", "diffusers", "transformers", "sbrender", "python"} <= set(result["versions"])
    assert [i["file"] for i in result["images"]] == ["cat-yaml.png"]
    assert result["images"][0]["seed"] == 42
    timings = result["timings"]
    for key in ("queued_at", "started_at", "finished_at"):
        assert timings[key].endswith("Z")
    for key in ("wait_s", "load_s", "inference_s", "write_s", "total_s"):
        assert timings[key] >= 0
    (image,) = _check_images(spool, result)
    assert image.size == (64, 72)
    infotext = image.text["parameters"]
    assert infotext.startswith("a cat on a mat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, "
                               "Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 64x72, Model: tiny-random")
    # The input left the inbox and is archived with its outcome (after the result is out).
    assert not (spool.inbox / "cat-yaml.yaml").exists()
    wait_for((spool.state / "done" / "cat-yaml.yaml").exists, message="cat-yaml.yaml not archived in state/done")


def test_json_job_with_several_images(live: tuple[Spool, DaemonProcess]) -> None:
    spool, _ = live
    spool.drop("dogs-json.json", {"prompt": "a dog", "cfg_scale": 5, "seed": 100, "count": 3, "steps": 2})
    result = spool.result("dogs-json")
    assert result["status"] == "succeeded", result
    assert result["params"]["guidance_scale"] == 5.0
    assert [(i["file"], i["seed"]) for i in result["images"]] == [
        ("dogs-json-1.png", 100), ("dogs-json-2.png", 101), ("dogs-json-3.png", 102)]
    images = _check_images(spool, result)
    assert len({img.tobytes() for img in images}) == 3, "different seeds must give different images"


def test_random_seed_is_recorded(live: tuple[Spool, DaemonProcess]) -> None:
    spool, _ = live
    spool.drop("noseed.yaml", "prompt: anything\n")
    result = spool.result("noseed")
    assert result["status"] == "succeeded"
    seed = result["params"]["seed"]
    assert isinstance(seed, int) and result["images"][0]["seed"] == seed
    assert f"Seed: {seed}," in Image.open(spool.outbox / "noseed.png").text["parameters"]


def test_batch_file_yields_one_result_per_job(live: tuple[Spool, DaemonProcess]) -> None:
    spool, _ = live
    spool.drop("batch-b.yaml", "defaults:\n  steps: 2\n  seed: 5\njobs:\n"
                               "  - prompt: first\n  - prompt: second\n    seed: 9\n"
                               "  - prompt: third\n    width: 65\n")
    first, second, third = (spool.result(f"batch-b-00{k}") for k in (1, 2, 3))
    assert (first["status"], second["status"], third["status"]) == ("succeeded", "succeeded", "failed")
    assert (first["params"]["seed"], second["params"]["seed"]) == (5, 9)
    assert first["input"]["batch_index"] == 1 and first["input"]["batch_size"] == 3
    assert third["error"]["field"] == "width"
    assert "multiple of 8" in third["error"]["message"] and "job 3 of the batch" in third["error"]["message"]
    # A batch with any failure is archived as failed, whole.
    wait_for((spool.state / "failed" / "batch-b.yaml").exists, message="batch file not archived")


def test_bad_file_fails_and_next_job_renders(live: tuple[Spool, DaemonProcess]) -> None:
    spool, _ = live
    spool.drop("broken.yaml", "prompt: [unclosed\n")
    spool.drop("unknown-field.json", {"prompt": "x", "stepz": 3})
    spool.drop("good-after-bad.yaml", "prompt: fine\n")
    broken = spool.result("broken")
    assert broken["status"] == "failed" and "not valid YAML" in broken["error"]["message"]
    assert broken["images"] == []
    unknown = spool.result("unknown-field")
    assert unknown["status"] == "failed"
    assert "stepz" in unknown["error"]["message"] and "allowed fields" in unknown["error"]["message"]
    assert spool.result("good-after-bad")["status"] == "succeeded"
    assert not list(spool.outbox.glob("broken*.png"))
    wait_for((spool.state / "failed" / "broken.yaml").exists, message="broken.yaml not archived in state/failed")


def test_finished_id_is_never_reused(live: tuple[Spool, DaemonProcess]) -> None:
    spool, _ = live
    spool.drop("once.yaml", "prompt: original\nseed: 1\n")
    original = spool.result("once")
    png = (spool.outbox / "once.png").read_bytes()
    spool.drop("once.json", {"prompt": "impostor", "seed": 2})
    dup = spool.result("once.dup1")
    assert dup["status"] == "failed" and dup["error"]["type"] == "duplicate_id"
    assert "once" in dup["error"]["message"]
    assert spool.result("once") == original
    assert (spool.outbox / "once.png").read_bytes() == png


def test_an_id_whose_result_was_removed_is_used_again(live: tuple[Spool, DaemonProcess], model_cache: Path) -> None:
    """A person clears a result from the outbox: the id is free again for every
    command, and a new job under it renders as itself, not as ``<id>.dup1``."""
    spool, _ = live
    env = daemon_env(model_cache)
    spool.drop("again.yaml", "prompt: first\nseed: 1\n")
    assert spool.result("again")["status"] == "succeeded"
    for path in spool.outbox.glob("again.*"):
        path.unlink()
    shown = sbrender("show", "again", *spool.cli_args(), env=env, cwd=spool.root)
    assert shown.returncode == 1 and "no job again in" in shown.stderr
    submitted = sbrender("submit", "second", "--seed", "2", "--id", "again", *spool.cli_args(), env=env,
                         cwd=spool.root)
    assert submitted.returncode == 0, submitted.stderr
    result = spool.result("again")
    assert result["status"] == "succeeded" and result["params"]["prompt"] == "second"
    for path in spool.outbox.glob("again.*"):
        path.unlink()
    spool.drop("again.yaml", "prompt: third\nseed: 3\n")
    result = spool.result("again")
    assert result["status"] == "succeeded" and result["params"]["prompt"] == "third"
    assert not list(spool.outbox.glob("again.dup*"))


def test_slow_writer_is_not_read_half_written(live: tuple[Spool, DaemonProcess]) -> None:
    """A file written in place (an editor, `cp`), in pieces with pauses, is read whole.

    With inotify the daemon waits for the writer to close the file, however long
    its pauses; polling can only wait for the settle interval (0.5 s here)."""
    spool, daemon = live
    pause = 1.5 if daemon.events("ready")[0]["watch"] == "inotify" else 0.2
    path = spool.inbox / "slow.yaml"
    with open(path, "w") as f:
        f.write("prompt: written slowly\n")
        f.flush()
        time.sleep(pause)
        f.write("steps: 2\n")
        f.flush()
        time.sleep(pause)
        f.write("seed: 77\n")
    result = spool.result("slow")
    assert result["status"] == "succeeded", result
    assert (result["params"]["steps"], result["params"]["seed"]) == (2, 77)


def test_ignored_names_are_left_alone(live: tuple[Spool, DaemonProcess]) -> None:
    spool, _ = live
    for name in (".hidden.yaml", "draft.yaml.tmp", "upload.json.part", "notes.txt"):
        (spool.inbox / name).write_text("prompt: not a job\n")
    written = time.time()
    spool.drop("marker-ignored.yaml", "prompt: after\n")
    spool.result("marker-ignored")
    # At least one full rescan since the files were written: the loop rescans when
    # watch.rescan_seconds (0.5 s here) have passed since the last one, so a loop
    # turn recorded (progress_at) more than that after the writes had one after them.
    wait_for(lambda: any(_timestamp(d.get("progress_at")) > written + 0.6 for d in _statuses(spool)),
             message="the daemon's loop did not turn after the writes")
    for name in (".hidden.yaml", "draft.yaml.tmp", "upload.json.part", "notes.txt"):
        assert (spool.inbox / name).exists()
    assert not list(spool.outbox.glob("hidden*")) and not list(spool.outbox.glob("draft*"))


def test_cli_submit_wait_jobs_show(live: tuple[Spool, DaemonProcess], model_cache: Path) -> None:
    spool, _ = live
    env = daemon_env(model_cache)
    proc = sbrender("submit", "a cat on a mat", "--size", "64x64", "--steps", "2", "--seed", "3",
                    "--meta", "owner=test", "--id", "cli-cat", "--wait", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(spool.outbox / "cli-cat.png")
    result = spool.result("cli-cat")
    assert result["metadata"] == {"owner": "test"} and result["params"]["seed"] == 3

    proc = sbrender("submit", "bad", "--steps", "100000", *spool.cli_args(), env=env, cwd=spool.root)
    assert proc.returncode == 1 and "steps" in proc.stderr and "150" in proc.stderr

    listing = sbrender("jobs", "--json", *spool.cli_args(), env=env, cwd=spool.root, check=True)
    states = {j["id"]: j["state"] for j in json.loads(listing.stdout)}
    assert states["cli-cat"] == "succeeded"

    shown = sbrender("show", "cli-cat", *spool.cli_args(), env=env, cwd=spool.root, check=True)
    assert json.loads(shown.stdout)["id"] == "cli-cat"
    missing = sbrender("show", "no-such-job", *spool.cli_args(), env=env, cwd=spool.root)
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr

    spool.drop("wait-bad.yaml", "prompt: three\nsteps: zero\n")
    failing = sbrender("wait", "wait-bad", "--timeout", "60", *spool.cli_args(), env=env, cwd=spool.root)
    assert failing.returncode == 1
    assert "wait-bad: failed: steps must be an integer" in failing.stderr


def test_file_renamed_in_from_another_folder(live: tuple[Spool, DaemonProcess]) -> None:
    """A web app writing into a sibling folder on the same volume, then renaming
    into the inbox (inotify reports it as IN_MOVED_TO, with no IN_MOVED_FROM seen)."""
    spool, _ = live
    staging = spool.root / "staging"
    staging.mkdir(exist_ok=True)
    (staging / "from-staging.json").write_text(json.dumps({"prompt": "staged", "seed": 11}))
    (staging / "from-staging.json").rename(spool.inbox / "from-staging.json")
    Client(spool.inbox, spool.outbox, spool.state).jobs()  # a reader opening it is not a writer
    result = spool.result("from-staging", timeout=20)
    assert result["status"] == "succeeded" and result["params"]["seed"] == 11


def test_cancel_queued_and_running_jobs_then_retry(live: tuple[Spool, DaemonProcess], model_cache: Path) -> None:
    spool, daemon = live
    env = daemon_env(model_cache)
    # A long render keeps the daemon busy while a second job waits behind it.
    spool.drop("busy.yaml", "prompt: long\nsteps: 60\n")
    deadline = time.monotonic() + 60
    while not any((d.get("current") or {}).get("job") == "busy" for d in _statuses(spool)):
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.05)
    spool.drop("queued.yaml", "- prompt: first of two\n  seed: 5\n- prompt: second of two\n")
    # Seen and parsed (both entries), waiting behind busy: the daemon looks at the
    # inbox between busy's steps and reports its queue at the next step.
    wait_for(lambda: any((d.get("current") or {}).get("job") == "busy" and d.get("queued") == 2
                         for d in _statuses(spool)),
             message=lambda: f"queued.yaml never seen waiting behind busy: {_statuses(spool)}")
    queued = sbrender("cancel", "queued-001", *spool.cli_args(), env=env, cwd=spool.root)
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.strip() == "queued-001: cancelled"
    running = sbrender("cancel", "busy", *spool.cli_args(), env=env, cwd=spool.root)
    assert running.stdout.strip() == "busy: cancelled", running.stdout + running.stderr
    busy = spool.result("busy")
    assert busy["status"] == "cancelled" and busy["error"]["type"] == "cancelled"
    assert not list(spool.outbox.glob("busy*.png"))
    assert spool.result("queued-002")["status"] == "succeeded", "the rest of the batch renders"
    again = sbrender("cancel", "busy", *spool.cli_args(), env=env, cwd=spool.root)
    assert again.returncode == 1 and "already finished (cancelled)" in again.stderr

    retried = sbrender("retry", "queued-001", *spool.cli_args(), env=env, cwd=spool.root)
    assert retried.returncode == 0, retried.stderr
    deadline = time.monotonic() + 60
    while (spool.result("queued-001").get("status")) == "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = spool.result("queued-001")
    assert result["status"] == "succeeded" and result["params"]["seed"] == 5
    assert result["params"]["prompt"] == "first of two"
    assert (spool.state / "retried" / "queued-001.1.json").exists()
    not_failed = sbrender("retry", "queued-002", *spool.cli_args(), env=env, cwd=spool.root)
    assert not_failed.returncode == 1 and "is succeeded; only a failed or cancelled job" in not_failed.stderr


def _timestamp(iso: str | None) -> float:
    """Seconds since the epoch of a result's or status file's time ("...Z"), 0 for none."""
    if not iso:
        return 0.0
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _statuses(spool: Spool) -> list[dict]:
    out = []
    for path in (spool.state / "daemons").glob("*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            pass
    return out


def test_wait_shows_progress_on_a_terminal_only(live: tuple[Spool, DaemonProcess], model_cache: Path) -> None:
    import os
    import pty
    import subprocess
    import sys

    spool, _ = live
    env = daemon_env(model_cache)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sbrender", "submit", "progress please", "--steps", "3",
                             "--id", "tty-job", "--wait", *spool.cli_args()], env=env, cwd=spool.root,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=120) == 0
    os.close(master)
    assert proc.stdout.read().strip() == str(spool.outbox / "tty-job.png")
    text = output.decode()
    assert "tty-job [" in text and "step " in text and "/3" in text, text
    # Not a terminal: nothing on stderr.
    quiet = sbrender("submit", "quietly", "--steps", "2", "--id", "pipe-job", "--wait", *spool.cli_args(),
                     env=env, cwd=spool.root)
    assert quiet.returncode == 0 and quiet.stderr == ""
