"""`create` from a Modelfile: each instruction changes what the model does, as claimed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ember
from ember.errors import InvalidRequestError, ModelNotFoundError
from ember.store.create import create
from ember.store.gguf_file import read_gguf
from ember.store.resolve import resolve_model
from ember.store.store import ModelStore
from ember.types import Message
from tests.conftest import greedy

QUESTION = [{"role": "user", "content": "Who are you?"}]


def _answer(name: str, **options: object) -> str:
    with ember.Model(name, num_ctx=512) as model:
        return model.chat(QUESTION, num_predict=24, **options).message.content


def _rendered_prompt(name: str, messages: list[dict[str, str]]) -> str:
    with ember.Model(name, num_ctx=512) as model:
        prompts = model.loaded.prompts
        return prompts.render_chat(prompts.chat_messages([Message(**m) for m in messages], None))


def test_system_changes_the_answer() -> None:
    create("pirate", 'FROM smollm2\nSYSTEM "You are a pirate named Captain Redbeard. Always say your name."\n')
    plain = _answer("smollm2", **greedy())
    pirate = _answer("pirate", **greedy())
    assert plain != pirate
    assert "Captain Redbeard" in _rendered_prompt("pirate", QUESTION)
    assert resolve_model("pirate").system.startswith("You are a pirate")


def test_parameter_temperature_zero_makes_it_deterministic() -> None:
    create("steady", "FROM smollm2\nPARAMETER temperature 0\nPARAMETER num_predict 24\nPARAMETER stop <|im_end|>\n")
    assert resolve_model("steady").parameters == {"temperature": 0.0, "num_predict": 24, "stop": ["<|im_end|>"]}
    answers = {_answer("steady") for _ in range(3)}
    assert len(answers) == 1
    hot = {_answer("smollm2", temperature=1.5, seed=seed) for seed in (1, 2, 3)}
    assert len(hot) > 1
    with ember.Model("steady", num_ctx=512) as model:
        assert model.sampling().temperature == 0  # the Modelfile default, beneath what a request says
        assert model.sampling(temperature=0.7).temperature == 0.7


def test_message_appears_in_the_rendered_prompt() -> None:
    create("seeded", 'FROM smollm2\nMESSAGE user "What is the secret word?"\nMESSAGE assistant "The word is mango."\n')
    rendered = _rendered_prompt("seeded", QUESTION)
    assert "What is the secret word?" in rendered and "The word is mango." in rendered
    assert rendered.index("mango") < rendered.index("Who are you?")


def test_a_go_template_is_translated_and_used() -> None:
    modelfile = (
        "FROM smollm2\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        '{{ .Response }}<|im_end|>\n"""\n'
        "SYSTEM Be brief.\n"
    )
    create("templated", modelfile)
    rendered = _rendered_prompt("templated", QUESTION)
    assert (
        rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_jinja_template_with_an_error_is_refused_before_registering() -> None:
    with pytest.raises(ember.EmberError, match="line"):
        create("badtemplate", 'FROM smollm2\nTEMPLATE """{% for m in messages %}"""\n')
    assert ModelStore().get("badtemplate") is None


def test_license_and_inheritance_from_a_stored_base() -> None:
    create("base", "FROM smollm2\nSYSTEM Base system.\nPARAMETER temperature 0.3\nLICENSE MIT-like terms\n")
    create("child", "FROM base\nPARAMETER top_k 5\n")
    child = resolve_model("child")
    assert child.system == "Base system."
    assert child.parameters == {"temperature": 0.3, "top_k": 5}
    assert "MIT-like terms" in (child.license or "")
    store = ModelStore()
    assert store.require("child").model_layer == store.require("base").model_layer


def test_from_a_relative_gguf_path(tmp_path: Path, model_path: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(model_path)
    create("frompath", "FROM ./model.gguf\n", base_dir=tmp_path)
    assert read_gguf(resolve_model("frompath").path).architecture == "llama"
    with pytest.raises(ModelNotFoundError, match=r"FROM \./missing\.gguf"):
        create("missing", "FROM ./missing.gguf\n", base_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="FROM nosuchbase"):
        create("missing", "FROM nosuchbase\n")


def test_adapter_with_a_tiny_lora_loads(tmp_path: Path, model_path: Path) -> None:
    from tests.lora_files import write_tiny_lora

    write_tiny_lora(model_path, tmp_path / "tiny-lora.gguf")
    create("adapted", "FROM smollm2\nADAPTER ./tiny-lora.gguf\n", base_dir=tmp_path)
    source = resolve_model("adapted")
    assert len(source.adapters) == 1 and source.adapters[0].is_file()
    with ember.Model("adapted", num_ctx=256) as model:
        assert model.generate("Hello", num_predict=4, **greedy()).eval_count == 4


def test_an_adapter_that_is_not_a_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"not a model")
    with pytest.raises(ember.CorruptModelError):
        create("badadapter", "FROM smollm2\nADAPTER ./bad.gguf\n", base_dir=tmp_path)
    assert ModelStore().get("badadapter") is None


def test_quantize_q4_0_yields_a_model_of_that_type_that_answers() -> None:
    manifest = create("smol-q4", "FROM smollm2\n", quantize="q4_0")
    info = read_gguf(ModelStore().blob_path(manifest.model_layer.digest))
    assert info.file_type == "Q4_0"
    with ember.Model("smol-q4", num_ctx=256) as model:
        result = model.generate("What is 2 + 2?", num_predict=8, **greedy())
    assert result.eval_count > 0 and result.response.strip()
    with pytest.raises(InvalidRequestError, match="q4_0"):
        create("smol-bad", "FROM smollm2\n", quantize="q3_bogus")
    assert ModelStore().get("smol-bad") is None


def test_ember_create_command_and_show_modelfile(tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text("from smollm2\nparameter temperature 0\nsystem You are terse.\n")
    cli = [sys.executable, "-m", "ember.cli.main"]
    created = subprocess.run(
        [*cli, "create", "terse", "-f", str(tmp_path / "Modelfile")], capture_output=True, text=True, timeout=120
    )
    assert created.returncode == 0, created.stderr
    shown = subprocess.run([*cli, "show", "terse", "--modelfile"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "FROM " in shown.stdout and "PARAMETER temperature 0" in shown.stdout and "You are terse." in shown.stdout
    (tmp_path / "Again").write_text(shown.stdout)
    again = subprocess.run(
        [*cli, "create", "terse2", "-f", str(tmp_path / "Again")], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert resolve_model("terse2").system == "You are terse."
    broken = tmp_path / "Broken"
    broken.write_text("FROM smollm2\nPARAMETER temprature 0\n")
    failed = subprocess.run([*cli, "create", "x", "-f", str(broken)], capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0 and "line 2" in failed.stderr and "Traceback" not in failed.stderr
