"""Chat templates render in Jinja's immutable sandbox; hostile templates are refused, not run."""

from __future__ import annotations

import pytest

from ember.chat_template import CHATML_TEMPLATE, ChatTemplate
from ember.errors import TemplateError

# The payload of CVE-2024-34359 (llama-cpp-python rendered model templates in a plain Environment).
CVE_2024_34359 = (
    "{% for x in ().__class__.__base__.__subclasses__() %}"
    "{% if 'warning' in x.__name__ %}{{ x()._module.__builtins__['__import__']('os').popen('touch pwned') }}"
    "{% endif %}{% endfor %}"
)


def test_the_cve_2024_34359_payload_is_refused(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError, match=r"sandbox|failed"):
        ChatTemplate(CVE_2024_34359).render([{"role": "user", "content": "hi"}])
    assert not (tmp_path / "pwned").exists()  # type: ignore[operator]


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ raise_exception('no system role') }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_internals_and_mutation_are_out_of_reach(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(TemplateError, match="line 2"):
        ChatTemplate("ok\n{% for %}")


def test_chatml_fallback_and_template_helpers() -> None:
    rendered = ChatTemplate(CHATML_TEMPLATE).render([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    helpers = ChatTemplate("{{ bos_token }}{{ messages | tojson }}{{ strftime_now('%Y') | length }}", bos_token="<s>")
    assert helpers.render([{"role": "user", "content": "héllo"}]) == '<s>[{"role": "user", "content": "héllo"}]4'


def test_the_models_own_template_is_used(model: object) -> None:
    prompts = model.loaded.prompts  # type: ignore[attr-defined]
    assert "<|im_start|>" in prompts.template_source
    rendered = prompts.render_chat(
        prompts.chat_messages([__import__("ember").Message(role="user", content="Hi")], None)
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
