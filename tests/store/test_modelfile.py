"""Reading and writing Ollama Modelfiles."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import InvalidRequestError
from ember.store.modelfile import Modelfile, ModelfileError, parse_modelfile, render_modelfile

FULL = '''\
# A Modelfile with every instruction
FROM llama3.2:1b

PARAMETER temperature 0.7
PARAMETER num_ctx 2048
PARAMETER stop "<|im_end|>"
PARAMETER stop <|im_start|>
PARAMETER use_mlock true
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}<|im_start|>user
{{ .Prompt }}<|im_end|>
<|im_start|>assistant
"""
SYSTEM You are Mario from Super Mario Bros.
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
LICENSE """MIT License
Copyright (c) someone"""
LICENSE Apache-2.0
ADAPTER ./lora.gguf
ADAPTER "/path with spaces/other.gguf"
'''


def error_for(text: str) -> ModelfileError:
    with pytest.raises(ModelfileError) as raised:
        parse_modelfile(text)
    return raised.value


def test_every_instruction() -> None:
    modelfile = parse_modelfile(FULL)
    assert modelfile == Modelfile(
        from_="llama3.2:1b",
        parameters={"temperature": 0.7, "num_ctx": 2048, "stop": ["<|im_end|>", "<|im_start|>"], "use_mlock": True},
        template=(
            "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
            "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
        ),
        system="You are Mario from Super Mario Bros.",
        messages=[{"role": "user", "content": "Is Toronto in Canada?"}, {"role": "assistant", "content": "yes"}],
        license=["MIT License\nCopyright (c) someone", "Apache-2.0"],
        adapters=["./lora.gguf", "/path with spaces/other.gguf"],
    )
    assert isinstance(modelfile.parameters["num_ctx"], int)
    assert isinstance(modelfile.parameters["temperature"], float)


def test_only_from() -> None:
    assert parse_modelfile("FROM ./model.gguf") == Modelfile(
        from_="./model.gguf", parameters={}, template=None, system=None, messages=[], license=[], adapters=[]
    )


def test_instructions_are_case_insensitive_and_in_any_order() -> None:
    text = (
        "system Be brief.\nParameter top_k 20\n  message USER hi\nlicense MIT\nadapter a.gguf\nfrom base\nTeMpLaTe x\n"
    )
    modelfile = parse_modelfile(text)
    assert modelfile.from_ == "base"
    assert modelfile.system == "Be brief."
    assert modelfile.parameters == {"top_k": 20}
    assert modelfile.messages == [{"role": "user", "content": "hi"}]
    assert (modelfile.license, modelfile.adapters, modelfile.template) == (["MIT"], ["a.gguf"], "x")


def test_comments_blank_lines_bom_and_crlf() -> None:
    text = "\ufeff# first\r\n\r\n   # indented comment\r\nFROM base  \r\n\t\r\nSYSTEM  hello # not a comment \r\n# last"
    modelfile = parse_modelfile(text)
    assert (modelfile.from_, modelfile.system) == ("base", "hello # not a comment")


def test_quoting_forms() -> None:
    text = (
        "FROM base\n"
        "MESSAGE user   bare value, surrounding spaces dropped   \n"
        'MESSAGE user "  double quoted, spaces kept  "\n'
        'MESSAGE user "say \\"hi\\" and a backslash \\\\ but C:\\path stays"\n'
        'MESSAGE user "double quoted\nacross lines"\n'
        'MESSAGE user """triple "quoted" with \\" kept\n\n# not a comment\nFROM not an instruction"""\n'
        'MESSAGE user ""\n'
        'MESSAGE user """"""\n'
        'MESSAGE user a"b"""c\n'
    )
    contents = [message["content"] for message in parse_modelfile(text).messages]
    assert contents == [
        "bare value, surrounding spaces dropped",
        "  double quoted, spaces kept  ",
        'say "hi" and a backslash \\ but C:\\path stays',
        "double quoted\nacross lines",
        'triple "quoted" with \\" kept\n\n# not a comment\nFROM not an instruction',
        "",
        "",
        'a"b"""c',
    ]


def test_parameter_types() -> None:
    text = (
        "FROM base\nPARAMETER seed -1\nPARAMETER top_p 1\nPARAMETER flash_attn FALSE\nPARAMETER use_mmap 1\n"
        "PARAMETER mirostat_eta 1e-2\nPARAMETER num_gpu 0\n"
    )
    parameters = parse_modelfile(text).parameters
    assert parameters == {
        "seed": -1,
        "top_p": 1.0,
        "flash_attn": False,
        "use_mmap": True,
        "mirostat_eta": 0.01,
        "num_gpu": 0,
    }
    assert isinstance(parameters["top_p"], float)


def test_repeated_parameters_stop_accumulates_others_last_wins() -> None:
    text = "FROM base\nPARAMETER stop a\nPARAMETER temperature 0.1\nPARAMETER stop b\nPARAMETER temperature 0.2\n"
    assert parse_modelfile(text).parameters == {"stop": ["a", "b"], "temperature": 0.2}


def test_repeated_template_and_system_last_wins() -> None:
    modelfile = parse_modelfile("FROM base\nSYSTEM one\nSYSTEM two\nTEMPLATE a\nTEMPLATE b")
    assert (modelfile.system, modelfile.template) == ("two", "b")


def test_tool_message_role_is_accepted() -> None:
    assert parse_modelfile("FROM base\nMESSAGE tool 42").messages == [{"role": "tool", "content": "42"}]


def test_options_ollama_ignores_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert parse_modelfile("FROM base\nPARAMETER penalize_newline true").parameters == {}
    assert "penalize_newline" in caplog.text


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ("FROM base\n\nFORM other", 3, r"unknown instruction 'FORM'; did you mean FROM\?"),
        ("FROM base\nINCLUDE x", 2, r"unknown instruction 'INCLUDE'"),
        ("FROM base\nREQUIRES 0.9", 2, r"REQUIRES"),
        ("# c\nFROM base\nPARAMETER temprature 0.5", 3, r"unknown PARAMETER 'temprature'; did you mean temperature\?"),
        ("FROM base\nPARAMETER temperature -1", 2, r"temperature.*greater than or equal to 0"),
        ("FROM base\nPARAMETER top_p 1.5", 2, r"top_p.*less than or equal to 1"),
        ("FROM base\nPARAMETER num_ctx 8", 2, r"num_ctx"),
        ("FROM base\nPARAMETER temperature hot", 2, r"temperature must be a number, not 'hot'"),
        ("FROM base\nPARAMETER top_k 1.5", 2, r"top_k must be a whole number"),
        ("FROM base\nPARAMETER use_mlock maybe", 2, r"use_mlock must be true or false"),
        ("FROM base\nPARAMETER temperature nan", 2, r"temperature"),
        ('FROM base\nPARAMETER stop ""', 2, r"stop strings must not be empty"),
        ("FROM base\nPARAMETER", 2, r"PARAMETER needs a name and a value"),
        ("FROM base\nPARAMETER top_k", 2, r"PARAMETER top_k needs a value"),
        (
            "FROM base\n\n\nMESSAGE bot hello",
            4,
            r"role must be one of system, user, assistant, tool, not 'bot'",
        ),
        ("FROM base\nMESSAGE", 2, r"MESSAGE role must be one of"),
        ("FROM base\nMESSAGE user", 2, r"MESSAGE user needs a value"),
        ("FROM base\nSYSTEM", 2, r"SYSTEM needs a value"),
        ("", 1, r"no FROM instruction"),
        ("# only a comment\nSYSTEM hi", 1, r"no FROM instruction"),
        ("FROM a\nSYSTEM hi\nFROM b", 3, r"second FROM \(the first is on line 1\)"),
        ('FROM ""', 1, r"FROM needs a model name or a path"),
        ('FROM base\nSYSTEM hi\nTEMPLATE """{{ .Prompt }}\n\nmore\n', 3, r'the """ of TEMPLATE .* never closed'),
        ('FROM base\nSYSTEM "never closed\nmore', 2, r"the quote .* of SYSTEM .* never closed"),
        ('FROM base\nSYSTEM "quoted" and more', 2, r"unexpected text 'and more' after the closing quote"),
        ('FROM base\nSYSTEM """a\nb""" c', 3, r"unexpected text 'c' after the closing quote"),
    ],
)
def test_errors_name_the_line(text: str, line: int, pattern: str) -> None:
    error = error_for(text)
    assert str(error).startswith(f"Modelfile line {line}: ")
    assert re.search(pattern, str(error)), str(error)
    assert error.line == line
    assert isinstance(error, InvalidRequestError)
    assert error.http_status == 400


def test_render_looks_like_ollama_show() -> None:
    text = render_modelfile(
        from_="/models/llama.gguf",
        parameters={"stop": ("<|im_end|>", " <pad> "), "temperature": 0.7, "use_mmap": None, "use_mlock": False},
        template='{{ .Prompt }}\n"',
        system="You are helpful.",
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 'He said\n"""hi"""'}],
        license=["MIT\nCopyright"],
        adapters=["./lora.gguf"],
    )
    assert text == (
        "FROM /models/llama.gguf\n"
        "ADAPTER ./lora.gguf\n"
        'TEMPLATE "{{ .Prompt }}\n\\""\n'
        "SYSTEM You are helpful.\n"
        "PARAMETER stop <|im_end|>\n"
        'PARAMETER stop """ <pad> """\n'
        "PARAMETER temperature 0.7\n"
        "PARAMETER use_mlock false\n"
        'LICENSE """MIT\nCopyright"""\n'
        "MESSAGE user Hi\n"
        'MESSAGE assistant "He said\n\\"\\"\\"hi\\"\\"\\""\n'
    )
    assert parse_modelfile(text).parameters == {
        "stop": ["<|im_end|>", " <pad> "],
        "temperature": 0.7,
        "use_mlock": False,
    }


def test_full_example_round_trips() -> None:
    modelfile = parse_modelfile(FULL)
    assert parse_modelfile(render_modelfile(**dataclasses.asdict(modelfile))) == modelfile


# Text that is hard to quote: quotes, triple quotes, backslashes, newlines, carriage returns, edge spaces, '#'.
tricky_text = st.text() | st.text(alphabet='"\\\n\r\t #aé{}', max_size=12)
nonempty_text = tricky_text.filter(bool)

PARAMETER_VALUES = {
    "temperature": st.floats(0, 5),
    "top_p": st.floats(0, 1),
    "repeat_penalty": st.floats(0.01, 10),
    "presence_penalty": st.floats(-2, 2),
    "mirostat_tau": st.floats(1e-6, 1e6),
    "top_k": st.integers(0, 10_000),
    "seed": st.integers(-1, 2**32 - 2),
    "num_predict": st.integers(-2, 10**9),
    "num_ctx": st.integers(16, 1 << 20),
    "use_mlock": st.booleans(),
    "use_mmap": st.booleans(),
    "flash_attn": st.booleans(),
    "stop": st.lists(nonempty_text, min_size=1, max_size=4),
}

modelfiles = st.builds(
    Modelfile,
    from_=nonempty_text,
    parameters=st.fixed_dictionaries({}, optional=PARAMETER_VALUES),
    template=st.none() | tricky_text,
    system=st.none() | tricky_text,
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": tricky_text}
        ),
        max_size=4,
    ),
    license=st.lists(tricky_text, max_size=3),
    adapters=st.lists(tricky_text, max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(modelfiles)
def test_render_then_parse_round_trips(modelfile: Modelfile) -> None:
    text = render_modelfile(**dataclasses.asdict(modelfile))
    assert parse_modelfile(text) == modelfile
