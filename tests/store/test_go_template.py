"""Ollama Go templates translated to Jinja, rendered with ember's own ChatTemplate."""

from __future__ import annotations

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.chat_template import CHATML_TEMPLATE, ChatTemplate
from ember.errors import TemplateError
from ember.store.go_template import is_go_template, translate_go_template

CHATML_GO = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
LLAMA2_GO = (
    "<s>[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST] {{ .Response }} </s>"
)
VICUNA_GO = "{{ if .System }}{{ .System }}\n\n{{ end }}USER: {{ .Prompt }}\nASSISTANT: {{ .Response }}</s>\n"

SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Why is the sky blue?"},
]
PLAIN_CHAT = SYSTEM_CHAT[1:]


def render(go_source: str, messages: list[dict[str, str]]) -> str:
    return ChatTemplate(translate_go_template(go_source)).render(messages)


@pytest.mark.parametrize(
    "source",
    [
        "{{ .Prompt }}",
        CHATML_GO,
        LLAMA2_GO,
        "{{- if .System }}x{{- end }}",
        "{{ range .Messages }}{{ .Content }}{{ end }}",
        "{{- range $i, $m := .Messages }}{{ end }}",
        "a{{ else }}b",
        "{{/* comment */}}",
        "{{ $x := 1 }}",
        "{{ with .System }}{{ . }}{{ end }}",
    ],
)
def test_is_go_template_recognises_go_actions(source: str) -> None:
    assert is_go_template(source)


@pytest.mark.parametrize(
    "source",
    [
        CHATML_TEMPLATE,
        "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}",
        "{{- messages[0]['content'] -}}",
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
        "{{ range(3) | list }}",
        "plain text with no actions",
        "",
    ],
)
def test_is_go_template_is_false_for_jinja(source: str) -> None:
    assert not is_go_template(source)


def test_translation_is_jinja_not_go() -> None:
    assert not is_go_template(translate_go_template(CHATML_GO))


def test_chatml_multi_turn_with_system() -> None:
    assert render(CHATML_GO, SYSTEM_CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_without_system() -> None:
    assert render(CHATML_GO, PLAIN_CHAT) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_single_user_message_matches_jinja_chatml() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert render(CHATML_GO, messages) == ChatTemplate(CHATML_TEMPLATE).render(messages)


def test_llama2_style() -> None:
    assert render(LLAMA2_GO, SYSTEM_CHAT) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Why is the sky blue? [/INST] "
    )
    assert render(LLAMA2_GO, PLAIN_CHAT) == "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Why is the sky blue? [/INST] "


def test_vicuna_style() -> None:
    assert render(VICUNA_GO, SYSTEM_CHAT) == (
        "Be brief.\n\nUSER: Hi\nASSISTANT: Hello!</s>\nUSER: Why is the sky blue?\nASSISTANT: "
    )


def test_template_without_response_gets_it_appended_as_ollama_does() -> None:
    source = "{{ .System }} USER: {{ .Prompt }} ASSISTANT:"
    assert render(source, SYSTEM_CHAT) == "Be brief. USER: Hi ASSISTANT:Hello! USER: Why is the sky blue? ASSISTANT:"


def test_trim_markers_remove_all_adjacent_whitespace() -> None:
    source = (
        "{{- if .System }}\n  <<SYS>> {{- .System -}} \n\t <</SYS>>\n{{- end }}\n"
        "[INST]   {{- .Prompt -}}   [/INST]\n\n  {{- .Response }}\n</s>"
    )
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render(source, messages) == "\n  <<SYS>>S<</SYS>>\n[INST]U[/INST]"
    messages += [{"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert render(source, messages) == "\n  <<SYS>>S<</SYS>>\n[INST]U[/INST]A\n</s>\n[INST]V[/INST]"


def test_a_dash_without_a_space_is_not_a_trim_marker() -> None:
    with pytest.raises(TemplateError):
        translate_go_template("a {{-.Prompt}}")


def test_literal_jinja_syntax_is_emitted_verbatim() -> None:
    source = '{% raw %}{# c #} {%- if x %}\'\\"{{ "{{" }} {{ .Prompt }} {{ `}}` }}{% endraw %}{{ .Response }}'
    messages = [{"role": "user", "content": "{{ 7*7 }}"}]
    assert render(source, messages) == "{% raw %}{# c #} {%- if x %}'\\\"{{ {{ 7*7 }} }}{% endraw %}"


def test_go_string_escapes() -> None:
    source = '{{ "tab\\there\\nnew \\"q\\" \\u00e9 \\x41 \\101" }}{{ .Prompt }}'
    assert render(source, [{"role": "user", "content": "!"}]) == 'tab\there\nnew "q" é A A!'


def test_comments_are_dropped() -> None:
    source = "A {{- /* a comment */ -}} B{{/* another */}}{{ .Prompt }}"
    assert render(source, [{"role": "user", "content": "!"}]) == "AB!"


def test_else_else_if_not_and_or() -> None:
    source = (
        "{{ if and .System .Prompt }}both{{ else if .System }}system{{ else if not .Prompt }}none"
        "{{ else }}prompt{{ end }}|{{ if or .System .Response }}yes{{ end }}|{{ .Prompt }}{{ .Response }}"
    )
    assert render(source, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "both|yes|U"
    assert render(source, [{"role": "system", "content": "S"}]) == "system|yes|"
    assert render(source, []) == "none||"
    assert render(source, [{"role": "user", "content": "U"}]) == "prompt||U"


def test_last_turn_is_cut_after_the_first_response_even_inside_an_if() -> None:
    source = "[{{ .Prompt }}]{{ if .Prompt }}<{{ .Response }}>{{ end }}tail"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render(source, [*messages, {"role": "user", "content": "c"}]) == "[a]<b>tail[c]<"


def test_final_assistant_message_is_continued() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    assert render(CHATML_GO, messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHel"


def test_consecutive_messages_of_one_role_are_merged_and_tool_messages_skipped() -> None:
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "U1"},
        {"role": "user", "content": "U2"},
        {"role": "tool", "content": "T"},
        {"role": "assistant", "content": "A"},
    ]
    assert render("({{ .System }}|{{ .Prompt }}|{{ .Response }})", messages) == "(S1\n\nS2|U1\n\nU2|A"


def test_empty_conversation_renders_the_empty_last_turn() -> None:
    assert render(CHATML_GO, []) == "<|im_start|>assistant\n"


def test_renders_the_same_in_a_plain_jinja_environment() -> None:
    plain = jinja2.Environment().from_string(translate_go_template(CHATML_GO))
    assert plain.render(messages=SYSTEM_CHAT) == render(CHATML_GO, SYSTEM_CHAT)


def ollama_reference(messages: list[dict[str, str]]) -> str:
    """Ollama's legacy Template.Execute for the template `({{ .System }}|{{ .Prompt }}|{{ .Response }})`."""
    collated: list[dict[str, str]] = []
    for message in messages:
        if collated and collated[-1]["role"] == message["role"]:
            collated[-1] = {"role": message["role"], "content": collated[-1]["content"] + "\n\n" + message["content"]}
        else:
            collated.append(dict(message))
    out, system, prompt, response = [], "", "", ""
    for message in collated:
        role, content = message["role"], message["content"]
        if role == "system":
            if prompt or response:
                out.append(f"({system}|{prompt}|{response})")
                system = prompt = response = ""
            system = content
        elif role == "user":
            if response:
                out.append(f"({system}|{prompt}|{response})")
                system = prompt = response = ""
            prompt = content
        elif role == "assistant":
            response = content
    out.append(f"({system}|{prompt}|{response}")
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "tool"]),
                "content": st.text(alphabet="ab\n{}'", max_size=3),
            }
        ),
        max_size=8,
    )
)
def test_turns_follow_ollama_for_any_conversation(messages: list[dict[str, str]]) -> None:
    assert render("({{ .System }}|{{ .Prompt }}|{{ .Response }})", messages) == ollama_reference(messages)


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda text: "{{" not in text and not text.endswith("{")))
def test_any_literal_text_survives(text: str) -> None:
    assert render(text + "{{ .Prompt }}", [{"role": "user", "content": "P"}]) == text + "P"


@pytest.mark.parametrize(
    ("source", "construct"),
    [
        ("{{ range .Messages }}{{ .Content }}{{ end }}", "range"),
        ("{{ if .Tools }}tools{{ end }}{{ .Prompt }}", ".Tools"),
        ("{{ .Messages }}", ".Messages"),
        ("{{ slice .Prompt 0 5 }}", "slice"),
        ("{{ json .Prompt }}", "json"),
        ("{{ $x := .Prompt }}{{ $x }}", "$x"),
        ("{{ with .System }}{{ . }}{{ end }}", "with"),
        ('{{ if eq .System "" }}x{{ end }}', "eq"),
        ("{{ .Prompt | printf }}", "|"),
        ('{{ template "x" }}', "template"),
        ("{{ .Suffix }}", ".Suffix"),
    ],
)
def test_untranslatable_constructs_are_refused(source: str, construct: str) -> None:
    with pytest.raises(TemplateError) as raised:
        translate_go_template(source)
    message = str(raised.value)
    assert construct in message
    assert "write the TEMPLATE in Jinja" in message
    assert raised.value.http_status == 400


def test_refusal_names_the_line() -> None:
    with pytest.raises(TemplateError, match=r"\(line 3\) uses a range loop"):
        translate_go_template("a\nb\n{{- range .Messages }}{{ end }}")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{{ if .System }}x", "no matching {{ end }}"),
        ("x{{ end }}", "no matching {{ if }}"),
        ("{{ if .System }}a{{ else }}b{{ else }}c{{ end }}", "no matching {{ if }}"),
        ("{{ .Prompt", "unclosed action"),
        ("{{/* x", "unclosed comment"),
        ("{{ if }}x{{ end }}", "no condition"),
        ("{{ }}", "empty action"),
    ],
)
def test_malformed_templates_are_refused(source: str, problem: str) -> None:
    with pytest.raises(TemplateError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        translate_go_template(source)
