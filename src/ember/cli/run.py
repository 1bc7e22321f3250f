"""`ember run MODEL [PROMPT]`: answer one prompt, streamed to stdout.

Takes Ollama's flags (`--verbose`, `--format json`, `--system`) and llama.cpp's (`-m`, `-p`, `-f`, `-n`, `-c`,
`-ngl`, `-t`, `--temp`, `--top-k` ...). The prompt comes from the arguments, `-p`, `-f`, and stdin when it
is a pipe or a heredoc; several sources are joined with newlines, stdin last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.cli import flags, remote
from ember.cli.output import print_metrics
from ember.errors import InvalidRequestError
from ember.model import Model
from ember.options import load_options, resolve_options
from ember.store.resolve import TRANSFORMERS, resolve_model
from ember.types import GenerateRequest, GenerateResponse, build_request


def register(app: typer.Typer) -> None:
    app.command("run", context_settings={"allow_interspersed_args": True})(run)


def _read_prompt(words: list[str], prompt: str | None, file: Path | None) -> str:
    parts = []
    if words:
        parts.append(" ".join(words))
    if prompt:
        parts.append(prompt)
    if file is not None:
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except OSError as error:
            raise InvalidRequestError(f"cannot read the prompt file {file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidRequestError(f"the prompt file {file} is not UTF-8 text") from None
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            parts.append(piped)
    if not parts:
        raise InvalidRequestError(
            'give a prompt: `ember run MODEL "your question"`, -p TEXT, -f FILE, or pipe text on stdin'
        )
    text = "\n".join(parts)
    if not text.strip():
        raise InvalidRequestError("the prompt is empty; give some text to answer")
    return text


def _format(value: str | None) -> str | dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    try:
        schema = json.loads(value)
    except json.JSONDecodeError:
        schema = None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"--format must be json or a JSON schema object, not {value!r}")
    return schema


def _drop_unset(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def run(
    model: Annotated[str | None, typer.Argument(help="Model name (smollm2) or path to a .gguf file.")] = None,
    words: Annotated[list[str] | None, typer.Argument(help="The prompt.", show_default=False)] = None,
    model_option: Annotated[str | None, typer.Option("-m", "--model", help="Model, llama.cpp style.")] = None,
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Prompt text.")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Read the prompt from a file.")] = None,
    system: Annotated[str | None, typer.Option("--system", "-sys", help="System prompt.")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="json, or a JSON schema the answer follows.")] = None,
    raw: Annotated[bool, typer.Option("--raw", "-no-cnv", help="Send the prompt without the chat template.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print timings and rates afterwards.")] = False,
    interactive: Annotated[
        bool, typer.Option("-i", "--interactive", help="Chat in the terminal (after answering a prompt, if any).")
    ] = False,
    interactive_first: Annotated[
        bool, typer.Option("--interactive-first", help="Chat in the terminal, waiting for input first.")
    ] = False,
    reverse_prompt: Annotated[
        list[str] | None,
        typer.Option("-r", "--reverse-prompt", help="In the chat, stop and hand back at this text (repeatable)."),
    ] = None,
    n_predict: flags.NPredict = None,
    temperature: flags.Temperature = None,
    top_k: flags.TopK = None,
    top_p: flags.TopP = None,
    min_p: flags.MinP = None,
    typical_p: flags.TypicalP = None,
    repeat_penalty: flags.RepeatPenalty = None,
    repeat_last_n: flags.RepeatLastN = None,
    presence_penalty: flags.PresencePenalty = None,
    frequency_penalty: flags.FrequencyPenalty = None,
    seed: flags.Seed = None,
    stop: flags.Stop = None,
    ctx_size: flags.CtxSize = None,
    gpu_layers: flags.GpuLayers = None,
    threads: flags.Threads = None,
    batch_size: flags.BatchSize = None,
    mlock: Annotated[
        bool | None, typer.Option("--mlock", help="Keep the model in RAM.", rich_help_panel=flags.LOADING)
    ] = None,
    no_mmap: Annotated[
        bool, typer.Option("--no-mmap", help="Read the model instead of mapping it.", rich_help_panel=flags.LOADING)
    ] = False,
    flash_attn: Annotated[
        bool | None, typer.Option("-fa/-no-fa", "--flash-attn/--no-flash-attn", rich_help_panel=flags.LOADING)
    ] = None,
) -> int | None:
    """Answer a prompt with a model, streamed to the terminal."""
    words = list(words or [])
    if model_option is not None:
        if model is not None:
            words.insert(0, model)
        model = model_option
    if model is None:
        raise InvalidRequestError('name a model: `ember run smollm2 "your question"` (or -m PATH.gguf)')
    load = _drop_unset(
        {
            "num_ctx": ctx_size,
            "num_gpu": gpu_layers,
            "num_thread": threads,
            "num_batch": batch_size,
            "use_mlock": mlock,
            "use_mmap": False if no_mmap else None,
            "flash_attn": flash_attn,
        }
    )
    sampling = _drop_unset(
        {
            "num_predict": n_predict,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "typical_p": typical_p,
            "repeat_penalty": repeat_penalty,
            "repeat_last_n": repeat_last_n,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "seed": seed,
            "stop": stop or None,
        }
    )
    resolve_options(load, sampling)  # a bad value or an unknown model fails here, before anything is read
    given = bool(words or prompt or file)
    if interactive or interactive_first or (not given and sys.stdin.isatty()):
        from ember.cli.repl import run_repl  # the chat in the terminal

        text = _read_prompt(words, prompt, file) if given else None
        return run_repl(
            model,
            load,
            sampling,
            system=system,
            format_=_format(format_),
            reverse_prompts=reverse_prompt or (),
            verbose=verbose,
            first=None if interactive_first else text,
            prefill=(text or "") if interactive_first else "",
        )
    served = remote.load(model, load) if remote.available() else None  # a running server answers, keeps it loaded
    source = resolve_model(model) if served is None else None
    text = _read_prompt(words, prompt, file)
    answer_format = _format(format_)

    if served is not None:
        request = {"model": served, "prompt": text, "system": system, "raw": raw, "format": answer_format}
        request = {key: value for key, value in request.items() if value is not None}
        final = _stream(remote.generate({**request, "options": {**load, **sampling}}))
    elif source is not None and source.engine == TRANSFORMERS:
        from ember.engine_transformers.runner import Answering

        answering = Answering(source, load_options(load))
        try:
            request = build_request(GenerateRequest, prompt=text, system=system, raw=raw, format=answer_format)
            request = request.model_copy(update={"options": sampling})
            final = _stream(answering.generate(request))
        finally:
            answering.close()
    else:
        with Model(source, **load) as loaded:
            chunks = loaded.generate(text, system=system, raw=raw, format=answer_format, stream=True, options=sampling)
            final = _stream(chunks)
    if verbose and final is not None:
        print_metrics(final, sys.stderr)


def _stream(chunks: Any) -> GenerateResponse | None:
    out = sys.stdout
    last_text = ""
    final = None
    try:
        for chunk in chunks:
            if chunk.response:
                out.write(chunk.response)
                out.flush()
                last_text = chunk.response
            if chunk.done:
                final = chunk
    except KeyboardInterrupt:
        chunks.close()  # cancels the sequence
        out.write("\n")
        raise
    if not last_text.endswith("\n"):
        out.write("\n")
    out.flush()
    return final
