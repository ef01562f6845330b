"""RequestOutputs across the engine process's pipe: what is decoded equals what was encoded,
whatever changed between two outputs, and each delta carries only the change."""

from __future__ import annotations

import pickle
import random

from sageserve.engine.request import RequestMetrics, RequestOutput
from sageserve.server.output_wire import OutputDecoder, OutputEncoder


def _output(rid: str, prompt: list[int], tokens: list[int], text: str, **kw) -> RequestOutput:
    fields = dict(
        request_id=rid,
        prompt=None,
        prompt_token_ids=prompt,
        text=text,
        token_ids=list(tokens),
        finished=False,
        finish_reason=None,
        stop_reason=None,
        logprobs=None,
        prompt_logprobs=None,
        num_cached_tokens=0,
        metrics=RequestMetrics(1.0, None, None),
    )
    return RequestOutput(**{**fields, **kw})


def _random_history(rng: random.Random, rid: str) -> list[RequestOutput]:
    """A request's cumulative outputs: tokens, text and logprobs growing by random steps,
    prompt logprobs filled in during the prefill, the text cut back when it finishes."""
    prompt = [rng.randrange(50000) for _ in range(rng.choice([1, 7, 200, 333]))]
    with_logprobs = rng.random() < 0.5
    prompt_logprobs: list[dict[int, float] | None] | None = (
        [None] * len(prompt) if rng.random() < 0.5 else None
    )
    tokens: list[int] = []
    logprobs: list[dict[int, float]] = []
    text = ""
    history = []
    for step in range(rng.randrange(1, 12)):
        grown = rng.randrange(0, 4)
        tokens += [rng.randrange(50000) for _ in range(grown)]
        logprobs += [{t: -rng.random()} for t in tokens[len(logprobs) :]]
        text += "".join(rng.choice("ab cdé\n") for _ in range(rng.randrange(0, 9)))
        if prompt_logprobs is not None and step < len(prompt):
            prompt_logprobs = list(prompt_logprobs)
            prompt_logprobs[step] = {prompt[step]: -rng.random()}
        history.append(
            _snapshot(rid, prompt, tokens, text, logprobs, prompt_logprobs, with_logprobs)
        )
    cut = text[: rng.randrange(len(text) + 1)]  # a stop string found at the end
    last = _snapshot(rid, prompt, tokens, cut, logprobs, prompt_logprobs, with_logprobs)
    last.finished, last.finish_reason = True, "stop"
    return [*history, last]


def _snapshot(rid, prompt, tokens, text, logprobs, prompt_logprobs, with_logprobs):
    return _output(
        rid,
        prompt,
        tokens,
        text,
        logprobs=list(logprobs) if with_logprobs else None,
        prompt_logprobs=list(prompt_logprobs) if prompt_logprobs else None,
        num_cached_tokens=len(prompt) // 2,
    )


def test_decoding_what_was_encoded_gives_every_output_back() -> None:
    rng = random.Random()
    histories = [_random_history(rng, f"r{i}") for i in range(12)]
    encoder, decoder = OutputEncoder(), OutputDecoder()
    while any(histories):
        live = [h for h in histories if h]
        batch = [h.pop(0) for h in rng.sample(live, rng.randrange(1, len(live) + 1))]
        wire = pickle.loads(pickle.dumps(encoder.encode(batch)))
        assert decoder.decode(wire) == batch
    assert not encoder._sent and not decoder._held  # finished requests are forgotten


def test_a_delta_carries_only_the_change() -> None:
    prompt = list(range(1000, 1333))
    first = _output("r", prompt, [5], "a", logprobs=[{5: -0.1}])
    later = _output("r", prompt, [5, 6, 7], "abc", logprobs=[{5: -0.1}, {6: -0.2}, {7: -0.3}])
    encoder = OutputEncoder()
    encoder.encode([first])
    (delta,) = encoder.encode([later])
    assert delta.prompt_token_ids is None and delta.token_tail == [6, 7]
    assert delta.text_tail == "bc" and delta.logprob_tail == [{6: -0.2}, {7: -0.3}]
    assert len(pickle.dumps(delta)) < len(pickle.dumps(later)) / 3


def test_a_forgotten_request_starts_over() -> None:
    """A failed step's requests end without a final output: both sides forget them."""
    prompt = [1, 2, 3]
    encoder, decoder = OutputEncoder(), OutputDecoder()
    decoder.decode(encoder.encode([_output("r", prompt, [9], "x")]))
    encoder.forget(["r"])
    decoder.forget(["r"])
    again = _output("r", prompt, [4], "y")
    assert decoder.decode(encoder.encode([again])) == [again]
