"""Prompts as A1111 reads them: emphasis, BREAK and tags, and the syntax refused until it renders."""

from __future__ import annotations

import pytest

from sbrender import prompts
from sbrender.errors import JobError
from sbrender.jobs import Rules, build_job


def rounded(segments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(text, round(weight, 4)) for text, weight in segments]


def test_the_reference_vector() -> None:
    got = prompts.parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert rounded(got) == [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
                            ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]


@pytest.mark.parametrize("text, expected", [
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 0.9091)]),
    ("a ((b) c", [("a ", 1.0), ("b", 1.21), (" c", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a \\ b", [("a  b", 1.0)]),  # a lone backslash is dropped
    ("unbalanced)", [("unbalanced)", 1.0)]),
    ("unbalanced]", [("unbalanced]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (b : 1.5 ) c", [("a ", 1.0), ("b ", 1.5), (" c", 1.0)]),
    ("(red:1.2:3)", [("red:1.2", 3.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("time: 1.5)", [("time: 1.5)", 1.0)]),  # a weight with no open bracket is text
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # only uppercase
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets: a word, not a break
])
def test_emphasis(text: str, expected: list[tuple[str, float]]) -> None:
    assert rounded(prompts.parse_emphasis(text)) == expected


def test_network_tags_leave_the_positive_text_and_stay_as_data() -> None:
    got = prompts.parse("a, <lora:add_detail:0.8>(cat:1.2)")
    assert rounded(list(got.segments)) == [("a, ", 1.0), ("cat", 1.2)]
    assert got.networks == (prompts.Network("lora", ("add_detail", "0.8"), "<lora:add_detail:0.8>"),)
    assert got.networks[0].name == "add_detail"
    negative = prompts.parse("<lora:x:1>", positive=False)
    assert negative.segments == (("<lora:x:1>", 1.0),) and negative.networks == ()


@pytest.mark.parametrize("text, message", [
    ("<hypernet:h:1> a", "extra networks (hypernet) are not supported yet; LoRAs (<lora:name:weight>) are"),
    ("<LORA:x:1> a", "uses the tag <LORA:x:1>: a LoRA tag is written <lora:name:weight>, in lower case"),
    ("a cat AND a dog", "uses AND (composable prompts), which is not supported yet"),
])
def test_syntax_not_rendered_yet_is_named(text: str, message: str) -> None:
    assert message in (prompts.problem(text) or "")


@pytest.mark.parametrize("text", [
    "a [cat] (dog:1.2) [(bird:1.3)]", "a \\[cat:dog:5\\]", "a | b", "a (cat|dog)", "[x:y]", "ANDROID and",
    "a (b:1.2)]", "", "a cat <lora:add_detail:0.8>",  # LoRA tags: sbrender.loras reads them
])
def test_plain_emphasis_is_no_problem(text: str) -> None:
    assert prompts.problem(text) is None


def test_the_negative_keeps_tags_and_and_as_text() -> None:
    assert prompts.problem("<lora:x:1>, a AND b", positive=False) is None


@pytest.mark.parametrize("text", ["a [cat:dog:5] on a mat", "a [cat::0.5]", "a [dog:10]", "a [(cat:1.2):dog: 5 ]",
                                  "a [cat|dog]", "a ([cat|dog]:1.2)"])
def test_prompt_editing_and_alternation_are_rendered_not_refused(text: str) -> None:
    assert prompts.problem(text) is None and prompts.problem(text, positive=False) is None


def test_a_job_using_them_is_refused_naming_the_field() -> None:
    for field, text, words in [("prompt", "cat <hypernet:x:1>", "extra networks (hypernet) are not supported yet"),
                               ("prompt", "a cat AND a dog", "uses AND (composable prompts)")]:
        data = {"prompt": "cat", field: text}
        with pytest.raises(JobError) as info:
            build_job("j", data, Rules())
        assert info.value.field == field
        assert words in info.value.message and info.value.message.startswith(f"{field} uses")
    assert build_job("j", {"prompt": "a (cat:1.3) BREAK [dog]"}, Rules()).prompt == "a (cat:1.3) BREAK [dog]"


def test_sbrender_validate_refuses_them_without_loading_torch(tmp_path) -> None:
    import json
    import subprocess
    import sys

    (tmp_path / "edit.yaml").write_text('prompt: "a cat AND a dog"\n')
    (tmp_path / "lora.json").write_text(json.dumps({"prompt": "a cat <lora:x:1>"}))
    (tmp_path / "fine.yaml").write_text('prompt: "a (cat:1.2) BREAK on a [mat]"\n')
    # validate in-process with torch imports blocked: the check must not need them
    code = ("import sys; sys.modules.update(torch=None, diffusers=None, transformers=None, PIL=None); "
            "from sbrender.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "validate", "--inbox", str(tmp_path / "in"),
                           "--outbox", str(tmp_path / "out"), "--state", str(tmp_path / "state"),
                           str(tmp_path / "edit.yaml"), str(tmp_path / "lora.json"), str(tmp_path / "fine.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("edit: invalid: prompt uses AND (composable prompts), which is not supported yet: "
                             "write one prompt (in lower case, \"and\" is an ordinary word)")
    # The LoRA name is looked up in loras_dir (./loras here, absent), still without torch.
    assert f"lora: invalid: unknown LoRA x: loras_dir {tmp_path / 'loras'} does not exist" in lines[1]
    assert lines[2].endswith("fine: ok")


@pytest.mark.parametrize("prompt, negative, words", [
    ("a cat", "blurry, <lora:x:1>", "negative_prompt: <lora:x:1> is encoded as text, as A1111 does"),
    ("a cat", "<hypernet:h:1> <lora:x:1>", "negative_prompt: <hypernet:h:1>, <lora:x:1> are encoded as text"),
    ("a cat", "blurry AND ugly", "negative_prompt: AND is encoded as text"),
    ("a | b [cat:dog:2]", "", "prompt: a | outside brackets makes A1111 read the whole text without prompt editing"),
])
def test_what_reads_differently_than_it_looks_is_noted(prompt: str, negative: str, words: str) -> None:
    (note,) = prompts.notes(prompt, negative)
    assert note.startswith(words)


def test_ordinary_prompts_have_no_notes() -> None:
    assert prompts.notes("a <lora:x:1> [cat|dog] (b:1.2)", "blurry, [lowres:3]") == []
