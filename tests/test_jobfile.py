"""Hostile job files: real files in a temp folder, read and parsed exactly as the daemon does."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sbrender.errors import JobError, UnsafeFileError
from sbrender.jobfile import parse_document, read_bytes
from sbrender.jobs import BadJob, Entry, Job, Rules, parse_job_bytes

LIMIT = 2048  # for the size checks of read_bytes
RULES = Rules()  # content is read with the default 1 MiB cap


def load(folder: Path, name: str, data: bytes) -> list[Entry]:
    """Write a real file, then read and parse it the daemon's way."""
    path = folder / name
    path.write_bytes(data)
    return parse_job_bytes(name, read_bytes(path, RULES.max_file_bytes), RULES)


def failure(folder: Path, name: str, data: bytes) -> JobError:
    """The error of a file that must yield exactly one failed job."""
    entries = load(folder, name, data)
    assert len(entries) == 1 and isinstance(entries[0], BadJob), entries
    return entries[0].error


# --- files that must not be read -------------------------------------------------------


def _symlink(folder: Path) -> Path:
    secret = folder / "secret.yaml"
    secret.write_text("prompt: the daemon must not read this\n")
    (folder / "job.yaml").symlink_to(secret)
    return folder / "job.yaml"


def _dangling_symlink(folder: Path) -> Path:
    (folder / "job.yaml").symlink_to(folder / "nowhere.yaml")
    return folder / "job.yaml"


def _symlink_to_folder(folder: Path) -> Path:
    (folder / "sub").mkdir()
    (folder / "job.yaml").symlink_to(folder / "sub")
    return folder / "job.yaml"


def _hard_link(folder: Path) -> Path:
    (folder / "elsewhere.yaml").write_text("prompt: a cat\n")
    os.link(folder / "elsewhere.yaml", folder / "job.yaml")
    return folder / "job.yaml"


def _directory(folder: Path) -> Path:
    (folder / "job.yaml").mkdir()
    return folder / "job.yaml"


def _oversized(folder: Path) -> Path:
    (folder / "job.yaml").write_bytes(b"prompt: " + b"x" * (LIMIT - 8) + b"\n")
    return folder / "job.yaml"


@pytest.mark.parametrize("make, message", [
    (_symlink, "job file is a symbolic link; it was not followed"),
    (_dangling_symlink, "job file is a symbolic link; it was not followed"),
    (_symlink_to_folder, "job file is a symbolic link; it was not followed"),
    (_hard_link, "job file has 2 hard links; only a file with one link is read"),
    (_directory, "job file is a directory, not a regular file"),
    (_oversized, f"job file is {LIMIT + 1} bytes, more than the limit of {LIMIT}"),
], ids=lambda v: getattr(v, "__name__", "")[1:] or None)
def test_unsafe_files_are_refused_unread(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(UnsafeFileError) as info:
        read_bytes(path, LIMIT)
    assert info.value.message == message
    assert info.value.to_dict()["type"] == "unsafe_file"


def finishes(work: Callable[[], object]) -> BaseException | None:
    """Run ``work`` in a thread; the exception it raised, or None.

    A guard against hanging the whole suite, not a timing assertion: the limit
    is far above what the work takes, and only a hang reaches it.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    if worker.is_alive():
        pytest.fail("still running after 120 s: it hangs")
    return outcome[0]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    try:
        err = finishes(lambda: read_bytes(fifo, LIMIT))
    finally:
        try:  # a blocked open() waits for a writer: give it one so the thread ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody is waiting: the expected case
    assert isinstance(err, UnsafeFileError)
    assert err.message == "job file is a FIFO, not a regular file"


def test_the_hard_link_message_tells_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match="copy the file into the inbox instead of linking it"):
        read_bytes(_hard_link(tmp_path), LIMIT)


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    data = b"prompt: " + b"x" * (LIMIT - 9) + b"\n"
    (tmp_path / "job.yaml").write_bytes(data)
    assert read_bytes(tmp_path / "job.yaml", LIMIT) == data


def test_a_plain_file_is_read_whole(tmp_path: Path) -> None:
    data = "prompt: un chat sur un tapis, été\n".encode() * 40
    (tmp_path / "job.yaml").write_bytes(data)
    assert read_bytes(tmp_path / "job.yaml", 1 << 20) == data


# --- content that must fail with a clear message ------------------------------------------

BILLION_LAUGHS = b"""\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
prompt: *g
"""


@pytest.mark.parametrize("name, data, message", [
    pytest.param("job.yaml", b"", "job file is empty", id="empty"),
    pytest.param("job.json", b"", "job file is empty", id="empty-json"),
    pytest.param("job.yaml", b"  \n\t\r\n  ", "job file is empty", id="whitespace"),
    pytest.param("job.yaml", b"prompt: caf\xe9\n", "job file is not UTF-8 text: byte 0xe9 at offset 11",
                 id="latin-1"),
    pytest.param("job.yaml", "prompt: a cat\n".encode("utf-16"), "job file is not UTF-8 text: byte 0xff at offset 0",
                 id="utf-16"),
    pytest.param("job.yaml", b"!!python/object/apply:os.system ['touch pwned']\n", "YAML tag not allowed (line 1)",
                 id="python-apply"),
    pytest.param("job.yaml", b"prompt: !!python/object:os.system {}\n", "YAML tag not allowed (line 1)",
                 id="python-object"),
    pytest.param("job.yaml", b"prompt: !!python/name:os.system ''\n", "YAML tag not allowed (line 1)",
                 id="python-name"),
    pytest.param("job.yaml", b"prompt: !custom a cat\n", "YAML tag not allowed (line 1)", id="custom-tag"),
    pytest.param("job.yaml", BILLION_LAUGHS, "YAML anchors and aliases are not allowed (line 1)",
                 id="billion-laughs"),
    pytest.param("job.yaml", b"base: &b {steps: 4}\njob:\n  <<: *b\n  prompt: a cat\n",
                 "YAML anchors and aliases are not allowed (line 1)", id="merge-key"),
    pytest.param("job.yaml", b"prompt: a cat\nsteps: 4\nprompt: a dog\n", "key 'prompt' appears twice (line 3)",
                 id="yaml-duplicate"),
    pytest.param("job.yaml", b"prompt: a cat\nmetadata:\n  row: 1\n  row: 2\n", "key 'row' appears twice (line 4)",
                 id="yaml-nested-duplicate"),
    pytest.param("job.json", b'{"prompt": "a cat", "prompt": "a dog"}', "key 'prompt' appears twice",
                 id="json-duplicate"),
    pytest.param("job.json", b'{"prompt": "a cat", "guidance_scale": NaN}', "JSON value NaN is not allowed",
                 id="json-nan"),
    pytest.param("job.json", b'{"prompt": "a cat", "guidance_scale": Infinity}',
                 "JSON value Infinity is not allowed", id="json-infinity"),
    pytest.param("job.json", b'{"prompt": "a cat", "metadata": {"x": -Infinity}}',
                 "JSON value -Infinity is not allowed", id="json-minus-infinity"),
    pytest.param("job.json", b"[" * 200_000 + b"]" * 200_000, "JSON is nested too deeply", id="json-deep"),
    pytest.param("job.yaml", b"{a: " * 300 + b"x" + b"}" * 300, "YAML is nested too deeply", id="yaml-deep-maps"),
    pytest.param("job.yaml", b"[" * 5000 + b"]" * 5000, "not valid YAML: while increasing flow level exceeded "
                 "maximum nesting depth", id="yaml-deep-lists"),
    pytest.param("job.yaml", b"? [a, b]\n: 1\nprompt: a cat\n",
                 "a mapping key must be a plain value, not list (line 1)", id="yaml-list-key"),
    pytest.param("job.yaml", b"prompt: a cat\n---\nprompt: a dog\n", "not valid YAML: expected a single document",
                 id="two-documents"),
    pytest.param("job.yaml", b"prompt: [a cat\n", "not valid YAML:", id="bad-yaml"),
    pytest.param("job.json", b'{"prompt": "a cat",}', "not valid JSON: Expecting property name enclosed in double "
                 "quotes (line 1, column 20)", id="bad-json"),
    pytest.param("job.yaml", b"a cat on a mat\n", "a job must be a mapping of fields, not a string", id="scalar"),
    pytest.param("job.yaml", b"42\n", "a job must be a mapping of fields, not an integer", id="number"),
    pytest.param("job.yaml", b"~\n", "a job must be a mapping of fields, not null", id="null"),
    pytest.param("job.json", b'"a cat"', "a job must be a mapping of fields, not a string", id="json-scalar"),
])
def test_hostile_content_fails_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                    data: bytes, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pwned").unlink(missing_ok=True)
    error = failure(tmp_path, name, data)
    assert error.message.startswith(message), error.message
    assert error.to_dict()["type"] == "invalid_job"
    assert not (tmp_path / "pwned").exists()


def test_a_megabyte_of_nesting_is_refused_without_stalling_the_daemon(tmp_path: Path) -> None:
    # The pure-Python YAML scanner is quadratic here: this file held it for hours.
    half = RULES.max_file_bytes // 2
    messages: list[str] = []
    assert finishes(lambda: messages.append(failure(tmp_path, "job.yaml", b"[" * half + b"]" * half).message)) is None
    assert messages[0].startswith("not valid YAML: while increasing flow level exceeded maximum nesting depth")


def test_a_big_yaml_file_fails_on_its_size_not_its_content(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(BILLION_LAUGHS * 300)
    with pytest.raises(UnsafeFileError, match="more than the limit"):
        read_bytes(path, LIMIT)


def test_a_list_of_scalars_fails_job_by_job(tmp_path: Path) -> None:
    entries = load(tmp_path, "cats.yaml", b"- a cat\n- a dog\n")
    assert [e.id for e in entries] == ["cats-001", "cats-002"]
    assert all(isinstance(e, BadJob) for e in entries)
    hint = ' (write at least: prompt: "a cat on a mat")'
    assert [str(e.error) for e in entries if isinstance(e, BadJob)] == [
        "job 1 of the batch: a job must be a mapping of fields, not a string" + hint,
        "job 2 of the batch: a job must be a mapping of fields, not a string" + hint,
    ]


def test_the_invalid_utf8_message_tells_what_to_do(tmp_path: Path) -> None:
    assert "save the file as UTF-8" in str(failure(tmp_path, "job.yaml", b"\xff\xfe"))


@pytest.mark.parametrize("name, data", [
    ("cat.yaml", b"\xef\xbb\xbfprompt: a cat\n"),
    ("cat.json", b'\xef\xbb\xbf{"prompt": "a cat"}'),
    ("cat.yml", b"prompt: a cat\r\n"),
    ("CAT.YAML", b"prompt: a cat\n"),
])
def test_ordinary_variations_are_accepted(tmp_path: Path, name: str, data: bytes) -> None:
    (entry,) = load(tmp_path, name, data)
    assert isinstance(entry, Job)
    assert entry.prompt == "a cat"


def test_a_second_bom_says_so(tmp_path: Path) -> None:
    assert failure(tmp_path, "cat.json", b'\xef\xbb\xbf\xef\xbb\xbf{"prompt": "a cat"}').message == (
        "not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (line 1, column 1)")


def test_yaml_scalars_that_are_not_plain_json_types_fail_field_checks(tmp_path: Path) -> None:
    assert failure(tmp_path, "a.yaml", b"prompt: !!binary aGVsbG8=\n").message == "prompt must be a string, not bytes"
    assert failure(tmp_path, "b.yaml", b"prompt: 2026-01-01\n").message == "prompt must be a string, not date"


def test_parse_document_picks_the_parser_by_extension() -> None:
    assert parse_document("a.YML", b"prompt: x\n") == {"prompt": "x"}
    assert parse_document("a.json", b'{"prompt": "x"}') == {"prompt": "x"}
    with pytest.raises(JobError, match="unknown job file type '.txt'"):
        parse_document("a.txt", b"prompt: x\n")


def test_every_refusal_is_a_job_error_not_a_crash(tmp_path: Path) -> None:
    """What the daemon relies on: bytes in, entries out, whatever the bytes."""
    corpus = [bytes(range(256)), b"\x00" * 64, b"prompt: \x00\n", b"{" * 100, b"- " * 900 + b"x",
              b"? {a: 1}\n: 2\n", b"!!set {a, b}\n", b"%YAML 9.9\n---\na: 1\n", b"prompt: a\n" * 50]
    for index, data in enumerate(corpus):
        for suffix in (".yaml", ".json"):
            name = f"f{index}{suffix}"
            entries = load(tmp_path, name, data)
            assert entries and all(isinstance(e, (Job, BadJob)) for e in entries)
