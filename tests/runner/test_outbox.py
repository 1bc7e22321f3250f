"""The runner's outbox: the text of several steps travels as one chunk per choice, in order, counted in tokens."""

from __future__ import annotations

from ember.runner.host import FLUSH_INTERVAL, MAX_FLUSH_INTERVAL, coalesced, flush_interval
from ember.runner.protocol import Done, Prefill, Text, ToolCalls
from ember.types import GenerateResponse, TokenLogprob, ToolCall, ToolCallFunction


def entry(token: str) -> TokenLogprob:
    return TokenLogprob(token=token, logprob=-1.0)


def test_each_choices_consecutive_text_becomes_one_event() -> None:
    events = [
        Text("r1", "Once", 0, (entry("Once"),)),
        Text("r2", "Hi", 0),
        Text("r1", "A", 1),
        Text("r1", " upon", 0, (entry(" upon"),), tokens=2),
        Text("r2", "!", 0),
        Text("r1", "B", 1),
    ]
    assert coalesced(events) == [
        Text("r1", "Once upon", 0, (entry("Once"), entry(" upon")), tokens=3),
        Text("r2", "Hi!", 0, tokens=2),
        Text("r1", "AB", 1, tokens=2),
    ]


def test_text_is_not_joined_across_another_event_of_its_request() -> None:
    final = GenerateResponse(model="m", done=True, done_reason="stop")
    call = ToolCall(function=ToolCallFunction(name="add", arguments={}))
    events = [
        Text("r1", "Let me add", 0),
        ToolCalls("r1", (call,), 0),
        Text("r1", " that.", 0),
        Text("r2", "x", 0),
        Prefill("r3", 10, 20),
        Text("r2", "y", 0),  # another request's event between: still one text
        Text("r1", "", 0, thinking="hmm"),  # thinking after content: a chunk of its own
        Done("r1", final, 0),
    ]
    assert coalesced(events) == [
        Text("r1", "Let me add", 0),
        ToolCalls("r1", (call,), 0),
        Text("r1", " that.", 0),
        Text("r2", "xy", 0, tokens=2),
        Prefill("r3", 10, 20),
        Text("r1", "", 0, thinking="hmm"),
        Done("r1", final, 0),
    ]
    assert coalesced([Text("r1", "", 0, thinking="so"), Text("r1", "Yes", 0)]) == [
        Text("r1", "Yes", 0, thinking="so", tokens=2)
    ]


def test_text_waits_longer_with_more_streams_only_on_the_cpu() -> None:
    assert flush_interval(1, on_cpu=True) == FLUSH_INTERVAL
    assert flush_interval(4, on_cpu=True) == 2 * FLUSH_INTERVAL
    assert flush_interval(8, on_cpu=True) == MAX_FLUSH_INTERVAL
    assert flush_interval(64, on_cpu=True) == MAX_FLUSH_INTERVAL
    assert flush_interval(64, on_cpu=False) == FLUSH_INTERVAL
