"""Command-line flags that several commands take, spelled as llama.cpp spells them (`ember run`, `ember batch`)."""

from __future__ import annotations

from typing import Annotated

import typer

SAMPLING = "Sampling"
LOADING = "Loading"

NPredict = Annotated[
    int | None, typer.Option("-n", "--n-predict", help="Most tokens to generate.", rich_help_panel=SAMPLING)
]
Temperature = Annotated[float | None, typer.Option("--temp", "--temperature", rich_help_panel=SAMPLING)]
TopK = Annotated[int | None, typer.Option("--top-k", rich_help_panel=SAMPLING)]
TopP = Annotated[float | None, typer.Option("--top-p", rich_help_panel=SAMPLING)]
MinP = Annotated[float | None, typer.Option("--min-p", rich_help_panel=SAMPLING)]
TypicalP = Annotated[float | None, typer.Option("--typical", rich_help_panel=SAMPLING)]
RepeatPenalty = Annotated[float | None, typer.Option("--repeat-penalty", rich_help_panel=SAMPLING)]
RepeatLastN = Annotated[int | None, typer.Option("--repeat-last-n", rich_help_panel=SAMPLING)]
PresencePenalty = Annotated[float | None, typer.Option("--presence-penalty", rich_help_panel=SAMPLING)]
FrequencyPenalty = Annotated[float | None, typer.Option("--frequency-penalty", rich_help_panel=SAMPLING)]
Seed = Annotated[int | None, typer.Option("-s", "--seed", rich_help_panel=SAMPLING)]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).", rich_help_panel=SAMPLING)]
CtxSize = Annotated[
    int | None, typer.Option("-c", "--ctx-size", help="Context window (num_ctx).", rich_help_panel=LOADING)
]
GpuLayers = Annotated[
    int | None,
    typer.Option("-ngl", "--n-gpu-layers", help="Layers on the GPU (num_gpu).", rich_help_panel=LOADING),
]
Threads = Annotated[int | None, typer.Option("-t", "--threads", rich_help_panel=LOADING)]
BatchSize = Annotated[int | None, typer.Option("-b", "--batch-size", rich_help_panel=LOADING)]
