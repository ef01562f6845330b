"""Log-probabilities of chosen tokens and of the top-N alternatives.

Semantics: logprobs describe the model's RAW distribution, ``log_softmax(logits)`` of the
logits as the model produced them, before penalties, suppression, temperature and the
top-k / top-p / min-p filters. SGLang and vLLM both report this by default, so a token that a
filter made impossible still gets a finite logprob, and the numbers do not move with the
sampling knobs. The same function serves output tokens (the sampled ids) and prompt tokens
(each position's logits against the next prompt token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenLogprobs:
    """Logprobs for M positions.

    chosen:       [M] float32, logprob of the chosen / actual token at each position.
    top_ids:      [M, K] int64, the K most likely tokens, by descending logprob.
    top_logprobs: [M, K] float32, their logprobs. K may be 0.
    """

    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int) -> TokenLogprobs:
    """Logprobs of ``token_ids`` and the ``top_n`` best tokens under ``log_softmax(logits)``.

    logits: [M, vocab] raw model logits (any float dtype; computed in float32).
    token_ids: [M] int64 on the same device.
    Returns tensors on the logits' device; nothing here syncs with the host.
    """
    assert logits.dim() == 2 and token_ids.shape == (logits.shape[0],)
    assert 0 <= top_n <= logits.shape[1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = logp.topk(top_n, dim=-1, largest=True, sorted=True)
    return TokenLogprobs(chosen=chosen, top_ids=top_ids, top_logprobs=top_logprobs)


def to_dicts(
    lp: TokenLogprobs, token_ids: Sequence[int], top_ns: Sequence[int]
) -> list[dict[int, float]]:
    """One ``{token_id: logprob}`` dict per position (one host transfer for all of them).

    Each dict holds the position's first ``top_ns[i]`` (<= K) top tokens in descending order,
    then the chosen token ``token_ids[i]`` if it was not among them, so the chosen token is
    always present, as in OpenAI / vLLM responses.
    """
    m = lp.chosen.shape[0]
    assert len(token_ids) == m and len(top_ns) == m
    k = lp.top_ids.shape[1]
    chosen = lp.chosen.tolist()
    top_ids = lp.top_ids.tolist()
    top_logprobs = lp.top_logprobs.tolist()
    out = []
    for i in range(m):
        assert 0 <= top_ns[i] <= k, f"top_ns[{i}]={top_ns[i]} exceeds the {k} computed"
        d = dict(zip(top_ids[i][: top_ns[i]], top_logprobs[i][: top_ns[i]], strict=True))
        d.setdefault(int(token_ids[i]), chosen[i])
        out.append(d)
    return out
