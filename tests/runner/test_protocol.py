"""The runner protocol's typed messages survive the pipe's pickling, and errors come back as their own class."""

from __future__ import annotations

import pickle

from ember.errors import ContextOverflowError, InvalidRequestError
from ember.runner.protocol import Done, Failed, Start, Steps, Text, ToolCalls, error_from_tuple, error_to_tuple
from ember.types import GenerateResponse, TokenLogprob, ToolCall, ToolCallFunction, TopLogprob


def test_events_cross_the_pipe_as_the_objects_the_server_uses() -> None:
    entry = TokenLogprob(token="Hi", logprob=-0.5, bytes=[72, 105], top_logprobs=[TopLogprob(token="Hi", logprob=-0.5)])
    final = GenerateResponse(model="m", response="!", done=True, done_reason="stop", eval_count=3)
    call = ToolCall(function=ToolCallFunction(name="add", arguments={"a": 1}))
    message = Steps(
        [
            Text("r1", "Hi", 1, (entry,)),
            Text("r1", "", 0, (), thinking="Two and two"),
            ToolCalls("r1", (call,), 2),
            Done("r1", final, 1),
            Failed("r2", ("E", "x", 500)),
        ]
    )
    copy = pickle.loads(pickle.dumps(message))
    assert copy == message
    assert isinstance(copy.events[0].logprobs[0], TokenLogprob) and copy.events[3].final.eval_count == 3
    assert copy.events[1].thinking == "Two and two" and copy.events[2].calls[0].function.arguments == {"a": 1}
    assert pickle.loads(pickle.dumps(Start("generate", "r1", {"model": "m"}, 3))).choices == 3


def test_errors_keep_their_class_message_and_status() -> None:
    error = error_from_tuple(error_to_tuple(ContextOverflowError(600, 512)))
    assert isinstance(error, ContextOverflowError) and "600" in str(error) and error.http_status == 400
    unknown = error_from_tuple(("SomethingElse", "it broke", 502))
    assert not isinstance(unknown, InvalidRequestError) and str(unknown) == "it broke" and unknown.http_status == 502
