"""The torch-free client: submitting into a real inbox, reading a hand-made outbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sbrender import ids
from sbrender.client import FAILED, PENDING, RUNNING, SUCCEEDED, Client, WaitTimeout, validate_file
from sbrender.errors import JobError, SbrenderError
from sbrender.jobs import BadJob, Job, Rules
from sbrender.peers import owner_name


@pytest.fixture
def client(tmp_path: Path) -> Client:
    for folder in ("inbox", "outbox", "state/work"):
        (tmp_path / folder).mkdir(parents=True)
    return Client(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state")


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def everything(client: Client) -> list[str]:
    root = client.inbox.parent
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def result(client: Client, job_id: str, status: str, prompt: str, finished_at: str, **extra: Any) -> Path:
    """An outbox JSON in the shape sbrender/results.py documents."""
    data: dict[str, Any] = {
        "schema": 1, "id": job_id, "status": status,
        "input": {"file": f"{job_id}.yaml", "sha256": "0" * 64, "claim": "1-2"},
        "params": {"prompt": prompt, "negative_prompt": "", "steps": 4, "guidance_scale": 7.0, "width": 64,
                   "height": 64, "seed": 1, "count": 1, "sampler": "Euler", "priority": 0},
        "images": [{"file": f"{job_id}.png", "seed": 1, "width": 64, "height": 64, "sha256": "1" * 64}]
        if status == SUCCEEDED else [],
        "metadata": {}, "timings": {"finished_at": finished_at}, **extra,
    }
    path = client.outbox / f"{job_id}.json"
    path.write_text(json.dumps(data))
    return path


# --- submit -------------------------------------------------------------------------------


def test_submit_writes_exactly_the_given_fields(client: Client) -> None:
    job_id = client.submit("a cat on a mat", job_id="cat-42", steps=4, negative_prompt=None, seed=7,
                           metadata={"row": 42})
    assert job_id == "cat-42"
    assert files(client.inbox) == ["cat-42.json"]  # no temp file left behind
    written = json.loads((client.inbox / "cat-42.json").read_text(encoding="utf-8"))
    assert written == {"prompt": "a cat on a mat", "steps": 4, "seed": 7, "metadata": {"row": 42}}


def test_a_submitted_file_is_what_the_daemon_accepts(client: Client) -> None:
    client.submit("un chat, été", job_id="chat", cfg_scale=5, sampler="euler a", count=2)
    (entry,) = validate_file(client.inbox / "chat.json", client.rules)
    assert isinstance(entry, Job)
    assert (entry.id, entry.prompt, entry.guidance_scale, entry.sampler, entry.count) == (
        "chat", "un chat, été", 5.0, "Euler a", 2)


def test_generated_ids_are_valid_and_distinct(client: Client) -> None:
    made = [client.submit("a cat") for _ in range(5)]
    assert len(set(made)) == 5
    assert all(ids.id_problem(job_id) is None for job_id in made)
    assert files(client.inbox) == sorted(f"{job_id}.json" for job_id in made)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps is 0, outside the allowed range 1 to 150"),
    ({"width": 500}, "width must be a multiple of 8, not 500"),
    ({"stepz": 4}, "unknown field: stepz"),
    ({"sampler": "Eulr"}, "unknown sampler 'Eulr'"),
    ({"metadata": {1: "one"}}, "metadata must hold only strings"),
    ({"loras": {"detail": "strong"}}, "loras: the weight of detail must be a number, not the string 'strong'"),
    ({"sampler": "DPM++ 2M", "scheduler": "Polyexponential"}, "schedule type 'Polyexponential' cannot be rendered"),
    ({"clip_skip": 13}, "clip_skip is 13, outside the allowed range 1 to 12"),
])
def test_submit_validates_before_writing_anything(client: Client, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError, match=message):
        client.submit("a cat", job_id="cat", **fields)
    assert everything(client) == []


def test_submit_refuses_an_unknown_lora_when_it_knows_the_folder(tmp_path: Path) -> None:
    from sbrender import loras
    from sbrender.config import load_settings

    spool = tmp_path / "spool"
    (spool / "inbox").mkdir(parents=True)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "add_detail.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    client = Client.from_settings(load_settings(empty, env={}, overrides={
        "inbox": str(spool / "inbox"), "outbox": str(spool / "outbox"), "state": str(spool / "state"),
        "loras_dir": str(tmp_path / "loras")}))
    with pytest.raises(JobError, match="unknown LoRA add_detial in .*did you mean add_detail"):
        client.submit("a cat <lora:add_detial:1>", job_id="cat")
    with pytest.raises(JobError, match="the weight in <lora:add_detail:x> must be a number"):
        client.submit("a cat <lora:add_detail:x>", job_id="cat")
    assert everything(client) == []
    client.submit("a cat <lora:add_detail:0.8>", job_id="cat", loras=None)
    # Without a catalog (a Client built by hand), the name waits for the daemon's check.
    bare = Client(spool / "inbox", spool / "outbox", spool / "state")
    assert bare.rules.loras is None
    bare.submit("a dog <lora:anything:1>", job_id="dog")
    assert isinstance(client.rules.loras, loras.Catalog)


def test_submit_without_a_prompt_is_refused(client: Client) -> None:
    with pytest.raises(JobError, match="prompt is missing"):
        client.submit(job_id="cat", steps=4)
    assert everything(client) == []


@pytest.mark.parametrize("job_id", ["../outside", "a b", ".hidden", "", "x" * 129])
def test_submit_refuses_a_bad_id(client: Client, job_id: str) -> None:
    with pytest.raises(JobError, match="bad job id"):
        client.submit("a cat", job_id=job_id)
    assert everything(client) == []
    assert not (client.inbox.parent / "outside.json").exists()


@pytest.mark.parametrize("existing", ["inbox/cat.yaml", "inbox/cat.json", "state/work/cat.yml",
                                      "state/work/host-1/cat.json", "outbox/cat.json"])
def test_submit_refuses_an_id_already_in_use(client: Client, existing: str) -> None:
    path = client.inbox.parent / existing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("prompt: the original\n")
    assert client.is_known("cat")
    with pytest.raises(JobError, match="job id cat is already in use"):
        client.submit("a cat", job_id="cat")
    assert everything(client) == [existing]
    assert path.read_text() == "prompt: the original\n"


def test_submit_needs_an_existing_inbox(tmp_path: Path) -> None:
    client = Client(tmp_path / "missing", tmp_path / "outbox")
    with pytest.raises(SbrenderError, match="does not exist"):
        client.submit("a cat", job_id="cat")
    assert list(tmp_path.iterdir()) == []


def test_submit_uses_the_clients_rules(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    client = Client(tmp_path / "inbox", tmp_path / "outbox", rules=Rules(max_steps=8))
    with pytest.raises(JobError, match="range 1 to 8"):
        client.submit("a cat", steps=9)


# --- jobs, status, show, wait ---------------------------------------------------------------


def test_jobs_lists_pending_then_finished(client: Client) -> None:
    (client.inbox / "cat.yaml").write_text("prompt: a cat\n")
    os.utime(client.inbox / "cat.yaml", (1_000, 1_000))
    (client.inbox / "dogs.yaml").write_text("- prompt: a dog\n- prompt: two dogs\n")
    os.utime(client.inbox / "dogs.yaml", (2_000, 2_000))
    (client.inbox / "bad.yaml").write_text("prompt: a bird\nsteps: 0\n")
    os.utime(client.inbox / "bad.yaml", (3_000, 3_000))
    (client.inbox / ".hidden.yaml").write_text("prompt: not a job\n")
    (client.inbox / "notes.txt").write_text("not a job\n")
    result(client, "done", SUCCEEDED, "a fish", "2026-01-01T00:00:00.000Z")
    result(client, "broken", FAILED, "a horse", "2026-01-02T00:00:00.000Z",
           error={"type": "render", "message": "out of memory"})
    (client.outbox / "junk.json").write_text("{not json")
    (client.outbox / ".broken.json.123.ab.tmp").write_text("{}")

    listed = [(j.id, j.state, j.prompt, j.file, j.error) for j in client.jobs()]
    assert listed == [
        ("cat", PENDING, "a cat", "cat.yaml", None),
        ("dogs-001", PENDING, "a dog", "dogs.yaml", None),
        ("dogs-002", PENDING, "two dogs", "dogs.yaml", None),
        ("bad", PENDING, "", "bad.yaml",
         "steps is 0, outside the allowed range 1 to 150 (limits.max_steps)"),
        ("done", SUCCEEDED, "a fish", "done.yaml", None),
        ("broken", FAILED, "a horse", "broken.yaml", "out of memory"),
    ]


def test_a_finished_job_is_listed_once(client: Client) -> None:
    (client.state / "work" / "cat.yaml").write_text("prompt: a cat\n")
    result(client, "cat", SUCCEEDED, "a cat", "2026-01-01T00:00:00.000Z")
    assert [(j.id, j.state) for j in client.jobs()] == [("cat", SUCCEEDED)]


def test_a_job_moving_on_while_jobs_lists_is_listed_once(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon claims a file just after the inbox is listed, and publishes its
    result and archives it just after its work folder is listed: the job is
    still listed, once, as finished."""
    import sbrender.client as client_module

    work = client.state / "work" / "host-1-2"
    work.mkdir()
    (client.inbox / "cat.yaml").write_text("prompt: a cat\n")
    listdir = os.listdir

    def racing_listdir(folder: Any) -> list[str]:
        names = listdir(folder)
        if Path(folder) == client.inbox and (client.inbox / "cat.yaml").exists():
            os.rename(client.inbox / "cat.yaml", work / "cat.yaml")  # claimed
        elif Path(folder) == work and (work / "cat.yaml").exists():
            result(client, "cat", SUCCEEDED, "a cat", "2026-01-01T00:00:00.000Z")  # published
            os.unlink(work / "cat.yaml")  # archived
        return names

    monkeypatch.setattr(client_module.os, "listdir", racing_listdir)
    assert [(j.id, j.state) for j in client.jobs()] == [("cat", SUCCEEDED)]


def test_a_daemon_starting_while_jobs_lists_the_inbox_is_looked_at(client: Client,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The work folders are listed after the inbox is read: a daemon that makes
    its folder and claims a file meanwhile is seen."""
    import sbrender.client as client_module

    (client.inbox / "cat.yaml").write_text("prompt: a cat\n")
    listdir = os.listdir

    def racing_listdir(folder: Any) -> list[str]:
        names = listdir(folder)
        if Path(folder) == client.inbox and (client.inbox / "cat.yaml").exists():
            (client.state / "work" / "host-1-2").mkdir()
            os.rename(client.inbox / "cat.yaml", client.state / "work" / "host-1-2" / "cat.yaml")
        return names

    monkeypatch.setattr(client_module.os, "listdir", racing_listdir)
    assert [(j.id, j.state) for j in client.jobs()] == [("cat", PENDING)]


def claim(client: Client, owner: str, name: str, text: str, state: str = "rendering") -> None:
    """A file claimed by daemon ``owner``, with that daemon's status file saying it renders it."""
    work = client.state / "work" / owner
    work.mkdir(parents=True, exist_ok=True)
    (work / name).write_text(text)
    (client.state / "daemons").mkdir(exist_ok=True)
    status = {"owner": owner, "state": state, "current": {"job": ids.stem(name)}}
    (client.state / "daemons" / f"{owner}.json").write_text(json.dumps(status))


def test_the_job_a_live_daemon_renders_is_running(client: Client) -> None:
    claim(client, owner_name(), "cat.yaml", "prompt: a cat\n")  # this test process is the live daemon
    (client.inbox / "dog.yaml").write_text("prompt: a dog\n")
    assert [(j.id, j.state) for j in client.jobs()] == [("cat", RUNNING), ("dog", PENDING)]
    state = client.status("cat")
    assert state is not None and state.state == RUNNING
    assert client.status("nobody") is None
    assert client.is_known("cat")


def test_a_claimed_file_wins_over_a_same_named_one_queued_behind_it(client: Client) -> None:
    """Dropping cat.yaml again while cat renders leaves the new file in the inbox
    (spool.claim): jobs and show describe the file being rendered."""
    claim(client, owner_name(), "cat.yaml", "prompt: the running cat\n")
    (client.inbox / "cat.yaml").write_text("prompt: a resubmitted dog\n")
    assert [(j.id, j.state, j.prompt) for j in client.jobs()] == [("cat", RUNNING, "the running cat")]
    shown = client.show("cat")
    assert shown is not None and shown["params"]["prompt"] == "the running cat"
    assert shown["file"] == str(client.state / "work" / owner_name() / "cat.yaml")


def test_the_job_of_a_dead_daemon_is_pending_again(client: Client) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    claim(client, owner_name(pid=int(gone.stdout)), "cat.yaml", "prompt: a cat\n")
    assert [(j.id, j.state) for j in client.jobs()] == [("cat", PENDING)]


def test_show_gives_the_result_or_the_pending_job(client: Client) -> None:
    path = result(client, "done", SUCCEEDED, "a fish", "2026-01-01T00:00:00.000Z")
    assert client.show("done") == json.loads(path.read_text())
    (client.inbox / "cat.yaml").write_text("prompt: a cat\nmetadata: {row: 1}\n")
    shown = client.show("cat")
    assert shown is not None
    assert (shown["status"], shown["params"]["prompt"], shown["metadata"]) == (PENDING, "a cat", {"row": 1})
    (client.inbox / "bad.yaml").write_text("prompt: a cat\nstepz: 1\n")
    bad = client.show("bad")
    assert bad is not None and bad["error"]["type"] == "invalid_job" and bad["error"]["field"] == "stepz"
    assert client.show("nobody") is None


def test_wait_returns_an_existing_result(client: Client) -> None:
    path = result(client, "done", SUCCEEDED, "a fish", "2026-01-01T00:00:00.000Z")
    assert client.wait("done", timeout=0) == json.loads(path.read_text())
    assert client.image_paths(client.wait("done")) == [client.outbox / "done.png"]


def test_wait_gives_up_with_wait_timeout(client: Client) -> None:
    client.submit("a cat", job_id="cat")
    with pytest.raises(WaitTimeout) as info:
        client.wait("cat", timeout=0.2, poll_s=0.05)
    assert info.value.message == "job cat has no result after 0.2 s"
    assert info.value.to_dict()["type"] == "timeout"


# --- validate_file ------------------------------------------------------------------------


def test_validate_file_checks_like_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "cats.yaml").write_text("defaults: {steps: 4}\njobs:\n  - prompt: one\n  - prompt: two\n    steps: 0\n")
    one, two = validate_file(tmp_path / "cats.yaml", Rules())
    assert isinstance(one, Job) and (one.id, one.steps) == ("cats-001", 4)
    assert isinstance(two, BadJob) and two.id == "cats-002"
    assert str(two.error).startswith("job 2 of the batch: steps is 0")


def test_validate_file_reports_an_unsafe_file_as_a_bad_job(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text("prompt: a cat\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    (entry,) = validate_file(tmp_path / "link.yaml", Rules())
    assert isinstance(entry, BadJob) and entry.id == "link"
    assert entry.error.to_dict() == {"type": "unsafe_file",
                                     "message": "job file is a symbolic link; it was not followed "
                                                "(put the file itself in the inbox)"}


def test_validate_file_respects_the_size_limit(tmp_path: Path) -> None:
    (tmp_path / "big.json").write_text(json.dumps({"prompt": "x" * 500}))
    (entry,) = validate_file(tmp_path / "big.json", Rules(max_file_bytes=100))
    assert isinstance(entry, BadJob)
    assert "more than the limit of 100" in entry.error.message


# --- staying light ------------------------------------------------------------------------


def test_the_client_and_cli_do_not_import_the_render_stack() -> None:
    # PIL too: only the daemon encodes images, and its import is a sixth of a CLI call's start.
    code = ("import sys, json, sbrender.client, sbrender.cli; "
            "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers', 'PIL') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_two_submits_of_one_id_cannot_replace_each_other(client: Client) -> None:
    """The id check and the publish are not atomic together; the publish itself
    refuses to replace (a double click submitting twice at once)."""
    from sbrender.client import _publish_new

    _publish_new(client.inbox, "twice.json", b'{"prompt": "first"}')
    with pytest.raises(JobError, match="already in use"):
        _publish_new(client.inbox, "twice.json", b'{"prompt": "second"}')
    assert json.loads((client.inbox / "twice.json").read_text()) == {"prompt": "first"}
    assert sorted(p.name for p in client.inbox.iterdir()) == ["twice.json"]


def test_client_from_the_daemons_config_uses_its_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sbrender.yaml"
    config.write_text(f"inbox: {tmp_path / 'in'}\noutbox: {tmp_path / 'out'}\nlimits: {{max_steps: 40}}\n")
    for name in [n for n in os.environ if n.startswith("SBRENDER_")]:
        monkeypatch.delenv(name)
    client = Client.from_config(config)
    (tmp_path / "in").mkdir()
    assert client.inbox == tmp_path / "in" and client.rules.max_steps == 40
    with pytest.raises(JobError, match="limits.max_steps"):
        client.submit("too many steps", steps=41)
    assert client.submit("fine", steps=40)


# --- the id ledger: one story -----------------------------------------------------------


def reservation(client: Client, job_id: str, file: Path) -> None:
    """``state/ids/<id>`` as a daemon leaves it: the claim token of ``file``."""
    st = os.stat(file)
    (client.state / "ids").mkdir(parents=True, exist_ok=True)
    (client.state / "ids" / job_id).write_text(f"{st.st_ino}-{st.st_mtime_ns}")


def test_an_id_is_in_use_only_while_a_job_holds_it(client: Client) -> None:
    """A daemon renders cats.yaml: job 1 failed, job 2 runs. Retrying job 1 gives
    its id back to the retried file; job 2's id is held while its file is claimed.
    Then the file is archived and a person deletes outbox/cats-002.*: every call
    says there is no such job, and the id can be used again."""
    from sbrender.spool import Spool

    claim(client, owner_name(), "cats.yaml", "- prompt: one\n- prompt: two\n")
    claimed = client.state / "work" / owner_name() / "cats.yaml"
    st = os.stat(claimed)
    for job_id in ("cats-001", "cats-002"):
        reservation(client, job_id, claimed)
    result(client, "cats-001", FAILED, "one", "2026-01-01T00:00:00.000Z",
           error={"type": "render", "message": "out of memory"}, input={"claim": f"{st.st_ino}-{st.st_mtime_ns}"})

    assert client.retry("cats-001") == "cats-001.json"
    daemon = Spool(client.inbox, client.outbox, client.state, owner=owner_name())
    retried = daemon.claim("cats-001.json")
    assert retried is not None
    info = os.stat(retried)
    assert daemon.reserve("cats-001", f"{info.st_ino}-{info.st_mtime_ns}"), "the retried file gets its id back"

    assert client.is_known("cats-002")
    with pytest.raises(JobError, match="already in use"):
        client.submit("a cat", job_id="cats-002")

    (client.state / "done").mkdir()
    os.rename(claimed, client.state / "done" / "cats.yaml")  # finished; its result then removed
    assert not client.is_known("cats-002")
    assert client.show("cats-002") is None
    with pytest.raises(JobError, match="no job cats-002 in the inbox, the work folders or the outbox"):
        client.retry("cats-002")
    assert client.submit("a cat again", job_id="cats-002") == "cats-002"


# --- messages -------------------------------------------------------------------------------


def test_retry_says_whether_a_job_is_unknown_or_not_finished_yet(client: Client) -> None:
    with pytest.raises(JobError) as unknown:
        client.retry("nobody")
    assert str(unknown.value) == "no job nobody in the inbox, the work folders or the outbox"
    (client.inbox / "cat.yaml").write_text("prompt: a cat\n")
    with pytest.raises(JobError) as pending:
        client.retry("cat")
    assert str(pending.value) == "job cat is not finished yet; only a failed or cancelled job can be retried"


def test_retry_of_a_refused_duplicate_gives_its_advice_once(client: Client) -> None:
    """A ``.dupN`` result's message already holds its error's hint."""
    path = client.outbox / "cat.dup1.json"
    path.write_text(json.dumps({
        "schema": 1, "id": "cat.dup1", "status": FAILED, "input": {"file": "cat.json", "claim": "1-2"},
        "images": [], "error": {"type": "duplicate_id", "message": "job id cat is already used by cat.yaml; ids "
                                "are never reused (submit it again under a new id (rename the file))"}}))
    with pytest.raises(JobError) as info:
        client.retry("cat.dup1")
    assert str(info.value).count("under a new id") == 1, str(info.value)


def cli(tmp_path: Path, *args: str) -> Any:
    from click.testing import CliRunner

    from sbrender.cli import main

    folders = ["--inbox", str(tmp_path / "inbox"), "--outbox", str(tmp_path / "outbox"),
               "--state", str(tmp_path / "state")]
    return CliRunner().invoke(main, [*args, *folders], env={"SBRENDER_CONFIG": str(tmp_path / "none.yaml")})


def test_jobs_refuses_a_missing_inbox_as_submit_does(tmp_path: Path) -> None:
    (tmp_path / "none.yaml").write_text("{}\n")
    listed = cli(tmp_path, "jobs")
    submitted = cli(tmp_path, "submit", "a cat")
    assert (listed.exit_code, submitted.exit_code) == (2, 2)
    assert listed.output == submitted.output == (
        f"sbrender: error: inbox {tmp_path / 'inbox'} does not exist (start the daemon once or create the folder)\n")


def test_jobs_shows_each_job_on_one_line(client: Client) -> None:
    tmp_path = client.inbox.parent
    (tmp_path / "none.yaml").write_text("{}\n")
    (client.inbox / "poem.yaml").write_text("prompt: |\n  a cat\n  on a   mat\n")
    (client.inbox / "long.yaml").write_text(f"prompt: {'x' * 100}\n")
    shown = cli(tmp_path, "jobs")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert len(lines) == 3, lines
    assert lines[1].endswith("a cat on a mat") or lines[2].endswith("a cat on a mat"), lines
    assert any(line.endswith("x" * 79 + "…") for line in lines), lines


def test_submit_takes_clip_skip_scheduler_and_loras_from_the_command_line(client: Client) -> None:
    tmp_path = client.inbox.parent
    loras_dir = tmp_path / "loras"
    loras_dir.mkdir()
    for name in ("add_detail", "ink wash"):  # empty safetensors files: the names are what submit checks
        (loras_dir / f"{name}.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    (tmp_path / "none.yaml").write_text(f"loras_dir: {loras_dir}\n")
    done = cli(tmp_path, "submit", "a cat", "--id", "cs", "--clip-skip", "2", "--sampler", "DPM++ 2M",
               "--scheduler", "karras", "--lora", "add_detail=0.8", "--lora", "ink wash=0.3:1")
    assert done.exit_code == 0, done.output
    job = json.loads((client.inbox / "cs.json").read_text())
    assert job == {"prompt": "a cat", "sampler": "DPM++ 2M", "scheduler": "karras", "clip_skip": 2,
                   "loras": {"add_detail": 0.8, "ink wash": {"te": 0.3, "unet": 1.0}}}
    bad = cli(tmp_path, "submit", "a cat", "--lora", "add_detail=strong")
    assert bad.exit_code == 2 and "'add_detail=strong': the weight must be a number" in bad.output
    deep = cli(tmp_path, "submit", "a cat", "--clip-skip", "13")
    assert deep.exit_code != 0 and "clip_skip is 13, outside the allowed range 1 to 12" in deep.output
