"""`ember.Model` as users call it: Ollama-style, llama-cpp-python-style, tokens, limits and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ember
from ember.errors import ContextOverflowError, InvalidOptionError, InvalidRequestError, ModelNotFoundError
from tests.conftest import greedy

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 150  # about 1500 tokens


def test_generate_reports_ollama_timings(model: ember.Model) -> None:
    result = model.generate("Why is the sky blue?", num_predict=12, **greedy())
    assert result.done and result.done_reason == "length"
    assert result.prompt_eval_count + result.prompt_cached_count > 10 and result.prompt_eval_duration > 0
    assert result.eval_count == 12 and result.eval_duration > 0
    assert result.total_duration >= result.prompt_eval_duration + result.eval_duration
    assert result["response"] == result.response  # subscriptable like the ollama client's responses
    assert result.eval_rate is not None and result.eval_rate > 0


def test_the_first_answer_reports_the_load_duration(model_path: Path) -> None:
    with ember.Model(model_path, num_ctx=256) as fresh:
        first = fresh.generate("Hi", num_predict=2)
        second = fresh.generate("Hi", num_predict=2)
    assert first.load_duration > 0
    assert second.load_duration == 0
    assert fresh.load_duration > 0


def test_an_empty_prompt_only_loads(model: ember.Model) -> None:
    result = model.generate("")
    assert result.done and result.done_reason == "load" and result.response == ""


def test_chat_answers_with_an_assistant_message(model: ember.Model) -> None:
    messages = [{"role": "user", "content": "Which city is the capital of France? Answer in one word."}]
    result = model.chat(messages, num_predict=30, **greedy())
    assert result.message.role == "assistant"
    assert "Paris" in result.message.content
    assert result["message"]["content"] == result.message.content
    assert result.prompt_eval_count > 0 and result.eval_count > 0


def test_a_system_prompt_changes_the_answer(model: ember.Model) -> None:
    question = [{"role": "user", "content": "Who are you?"}]
    plain = model.chat(question, num_predict=30, **greedy()).message.content
    pirate = model.chat(
        [{"role": "system", "content": "You are a pirate named Captain Redbeard. Always say your name."}, *question],
        num_predict=30,
        **greedy(),
    ).message.content
    assert plain != pirate
    via_generate = model.generate(
        "Who are you?",
        system="You are a pirate named Captain Redbeard. Always say your name.",
        num_predict=30,
        **greedy(),
    ).response
    assert via_generate == pirate


def test_template_and_system_can_be_replaced(model_path: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    with ember.Model(model_path, num_ctx=256, template=template, system="Be brief.") as custom:
        tokens = custom.loaded.prompts.tokenize_prompt(
            custom.loaded.prompts.render_chat(
                custom.loaded.prompts.chat_messages([ember.Message(role="user", content="Hello")], None)
            )
        )
        assert custom.detokenize(tokens) == "[system] Be brief.\n[user] Hello\n[assistant]"
        assert custom.generate("Hello", num_predict=4, **greedy()).eval_count == 4


def test_context_tokens_continue_a_conversation(model: ember.Model) -> None:
    first = model.generate("My name is Ada.", num_predict=10, **greedy())
    second = model.generate("What is my name?", context=first.context, num_predict=20, **greedy())
    assert second.prompt_cached_count >= len(first.context) - 1
    assert second.prompt_eval_count + second.prompt_cached_count > len(first.context)


def test_an_over_long_prompt_gives_an_error_naming_both_numbers(model: ember.Model) -> None:
    count = model.count_tokens(LONG_TEXT)
    with pytest.raises(ContextOverflowError) as caught:
        model.generate(LONG_TEXT, raw=True, num_predict=8)
    message = str(caught.value)
    assert str(caught.value.prompt_tokens) in message and "1024" in message
    assert caught.value.prompt_tokens >= count
    assert caught.value.http_status == 400
    with pytest.raises(ContextOverflowError, match="1024"):
        model.chat([{"role": "user", "content": LONG_TEXT}], num_predict=8)


def test_truncation_happens_only_when_asked(model: ember.Model) -> None:
    result = model.generate(LONG_TEXT, raw=True, truncate=True, num_predict=8, **greedy())
    assert result.eval_count == 8
    assert result.prompt_eval_count < 1024

    old_turns = [{"role": "user", "content": LONG_TEXT[:1500]}, {"role": "assistant", "content": "OK."}] * 3
    messages = [{"role": "system", "content": "Be kind."}, *old_turns, {"role": "user", "content": "Say hi."}]
    with pytest.raises(ContextOverflowError):
        model.chat(messages, num_predict=8)
    truncated = model.chat(messages, truncate=True, num_predict=8, **greedy())
    assert truncated.prompt_eval_count < 1024 and truncated.eval_count > 0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"num_predict": -5}, "num_predict"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"temperature": "hot"}, "temperature"),
        ({"temprature": 0.5}, "did you mean temperature"),
        ({"stop": 5}, "stop"),
    ],
)
def test_invalid_options_give_clear_errors(model: ember.Model, options: dict, fragment: str) -> None:
    with pytest.raises(InvalidOptionError, match=fragment) as caught:
        model.generate("Hi", **options)
    assert caught.value.http_status == 400


def test_invalid_load_options_are_refused_before_loading(model_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="num_ctx"):
        ember.Model(model_path, num_ctx=0)
    with pytest.raises(InvalidOptionError, match="num_thread"):
        ember.Model(model_path, num_thread=-4)
    with pytest.raises(InvalidOptionError, match="sampling option"):
        ember.Model(model_path, temperature=0.5)


def test_an_unknown_model_name_says_what_to_do() -> None:
    with pytest.raises(ModelNotFoundError, match="nosuchmodel"):
        ember.Model("nosuchmodel:7b")
    with pytest.raises(ModelNotFoundError, match=r"missing\.gguf"):
        ember.Model("/nonexistent/dir/missing.gguf")


def test_images_are_refused_by_a_text_model(model: ember.Model) -> None:
    with pytest.raises(InvalidRequestError, match="images"):
        model.generate("What is this?", images=["aGVsbG8="])


def test_tokenize_detokenize_and_count(model: ember.Model) -> None:
    text = "Hello, world! Ünïcödé ✓"
    tokens = model.tokenize(text, add_special=False)
    assert model.detokenize(tokens) == text
    assert model.count_tokens(text) == len(tokens)
    assert model.tokenize(text.encode()) == model.tokenize(text)
    with pytest.raises(InvalidRequestError):
        model.detokenize([-1])


def test_calling_the_model_like_llama_cpp_python(model: ember.Model) -> None:
    output = model(
        "Q: Name the planets in the solar system? A: ", max_tokens=32, stop=["Q:", "\n"], echo=True, temperature=0
    )
    assert output["object"] == "text_completion"
    text = output["choices"][0]["text"]
    assert text.startswith("Q: Name the planets in the solar system? A: ")
    assert "\n" not in text
    usage = output["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert output["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_like_llama_cpp_python(model: ember.Model) -> None:
    whole = model("Once upon a time", max_tokens=20, temperature=0)["choices"][0]["text"]
    chunks = list(model("Once upon a time", max_tokens=20, temperature=0, stream=True))
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["object"] == "text_completion" for chunk in chunks)


def test_chat_completion_like_llama_cpp_python(model: ember.Model) -> None:
    messages = [{"role": "user", "content": "Give a JSON object with a key colour."}]
    result = model.create_chat_completion(
        messages, temperature=0, max_tokens=60, response_format={"type": "json_object"}
    )
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(json.loads(message["content"]), dict | list | str | int | float | bool | None)
    chunks = list(model.create_chat_completion(messages, temperature=0, max_tokens=10, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_llama_constructor_names_are_accepted(model_path: Path) -> None:
    with ember.Model(model_path=model_path, n_ctx=300, n_threads=1, n_batch=64, n_gpu_layers=0) as llama_style:
        assert llama_style.options.num_ctx == 300
        assert llama_style.options.num_thread == 1
        assert llama_style.options.num_batch == 64
        assert llama_style("Hello", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_a_different_load_option_in_a_call_reloads(model_path: Path) -> None:
    with ember.Model(model_path, num_ctx=256) as reloading:
        reloading.generate("Hi", num_predict=1)
        result = reloading.generate("Hi", num_predict=1, num_ctx=512)
        assert reloading.options.num_ctx == 512
        assert result.load_duration > 0
        same = reloading.generate("Hi", num_predict=1, temperature=0.1)
        assert same.load_duration == 0


def test_model_info_comes_from_the_gguf(model: ember.Model) -> None:
    assert model.info.architecture == "llama"
    assert 100_000_000 < model.info.parameter_count < 200_000_000
    assert model.info.file_type.lower() == "q4_1"


def test_threads_sharing_a_model_get_the_answers_they_get_alone() -> None:
    """Each thread's sequence joins the shared batches; none loses its first text to another thread's step."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Give one word that rhymes with number {i}." for i in range(8)]
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 5}
    with ember.Model("smollm2", num_ctx=256, num_parallel=4) as shared:
        alone = [shared.chat([{"role": "user", "content": p}], **options).message.content for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            together = list(
                pool.map(lambda p: shared.chat([{"role": "user", "content": p}], **options).message.content, prompts)
            )
    assert together == alone and all(alone)
