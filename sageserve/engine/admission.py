"""What a request must satisfy before the engine queues it: checks with messages that say
what to change. Each raises ValueError (the server answers 400 with its message)."""

from __future__ import annotations

from typing import Any

from sageserve.engine.sampling_params import SamplingParams


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text prompt, special tokens such as BOS added.

    ValueError for text that is not valid Unicode (a lone UTF-16 surrogate, which a JSON
    escape can carry): tokenizers raise a TypeError on it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"the prompt is not valid text: a lone surrogate at character {err.start}"
        ) from None
    return list(tokenizer.encode(text))


def check_prompt(token_ids: list[int], vocab: int, context_length: int, pool_tokens: int) -> None:
    """A prompt is servable: not empty, ids in [0, vocab), room for one new token in the
    context length and in a pool of pool_tokens tokens."""
    if not token_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if len(token_ids) >= context_length:
        raise ValueError(
            f"the prompt has {len(token_ids)} tokens; the context length is "
            f"{context_length}, which must leave room for at least one new token"
        )
    if len(token_ids) + 1 > pool_tokens:
        raise ValueError(
            f"the prompt has {len(token_ids)} tokens but the KV pool holds only "
            f"{pool_tokens}; raise --max-total-tokens"
        )


def check_param_token_ids(params: SamplingParams, vocab: int) -> None:
    """Token ids in ``params`` the model has a logit for (SamplingParams checks them
    without knowing the model)."""
    fields = {
        "stop_token_ids": params.stop_token_ids,
        "logit_bias": [t for t, _ in params.logit_bias],
    }
    for name, ids in fields.items():
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ValueError(f"{name} {bad[:5]} are outside the vocabulary [0, {vocab})")
