"""Turn one step's logits into one token per row.

Order of operations for every row:

    penalties -> logit bias -> suppression -> temperature -> top-k -> top-p -> min-p -> sample

* penalties: repetition (HF/vLLM: positive logits divided, negative multiplied, over prompt +
  output tokens), then frequency and presence (OpenAI: subtracted, over output tokens).
* logit bias: ``SamplingParams.logit_bias`` added to its tokens' logits (OpenAI: -100 bans a
  token, +100 all but forces it, in greedy rows too). After the penalties, so a penalty never
  scales the bias; a suppressed token stays -inf whatever its bias.
* suppression: ``SamplingRow.suppressed_token_ids`` set to -inf (EOS / stop ids while the
  request is below ``min_new_tokens``).
* greedy rows (temperature 0) stop here: argmax of the penalised, biased, suppressed logits
  (first index on ties), no noise, generator untouched.
* random rows: logits / temperature; top-k keeps the k largest logits; top-p keeps the most
  likely tokens, in descending order, while the mass before them (renormalised after top-k)
  is below top_p; min-p keeps tokens whose probability is >= min_p * the best one's. Each
  filter also keeps every token tied with the last one kept. Then the exponential race:
  argmax(probs / E) with E ~ Exp(1) i.i.d. picks token i with probability probs[i] (the
  Gumbel-max trick in probability space), without the host sync of torch.multinomial.

Batch independence and seeding: each step a random row draws ONE int64 from its own
generator and expands it on the logits' device into ``vocab`` Exp(1) values with a
counter-based hash (splitmix64), and every operation is row-wise with tie-independent
filters. So a row's token depends only on its logits, params, history and generator, never on
the other rows of the batch, and the same seed replays the same tokens.

Logprobs come from the RAW logits (see ``logprobs.py``), not from the processed ones: the
penalties, the logit bias and the filters change which token is picked, never the logprobs
reported for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sageserve.engine.logprobs import TokenLogprobs, compute_logprobs
from sageserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One row of the logits matrix that must be sampled."""

    params: SamplingParams
    # Per-request generator (normally CPU): the only source of this row's noise.
    generator: torch.Generator
    # Histories for the penalties; a CPU int64 tensor is accepted too (cheaper, see
    # ``_token_counts``). Only read when the row has penalties.
    prompt_token_ids: Sequence[int] | torch.Tensor
    output_token_ids: Sequence[int] | torch.Tensor
    suppressed_token_ids: Sequence[int] = ()


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    # [N] rows, for the chosen tokens, from the raw distribution; K = max logprobs asked.
    # Rows that did not ask get values too (the caller ignores them). None if no row asked.
    logprobs: TokenLogprobs | None


@dataclass
class SampledTokens:
    """What `Sampler.sample` leaves on the logits' device: token_ids [N] int64, and the
    logprobs as in SamplerOutput."""

    token_ids: torch.Tensor
    logprobs: TokenLogprobs | None


class Sampler:
    """Stateless: all per-request state arrives in the ``SamplingRow``s."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample one token per row and read the tokens back to the host.

        logits: [N, vocab] float logits, CPU or CUDA; not modified.
        rows: N rows, row i describing ``logits[i]``.
        """
        sampled = self.sample(logits, rows)
        return SamplerOutput(sampled.token_ids.tolist(), sampled.logprobs)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampledTokens:
        """`__call__` without the read-back: nothing here waits for the device.

        logits: [N, vocab] float logits, CPU or CUDA; not modified. Returns [N] token ids
        (and logprobs) on the logits' device.
        """
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        work = logits.float()
        if any(_edits_in_place(r) for r in rows):
            work = work.clone()  # edited in place below; the caller's logits stay raw
        _apply_penalties(work, rows)
        _apply_logit_bias(work, rows)
        _apply_suppression(work, rows)
        token_ids = _sample(work, rows)
        return SampledTokens(token_ids, logprobs_for_rows(logits, token_ids, rows))


def _edits_in_place(row: SamplingRow) -> bool:
    """True when the row's logits are changed before sampling (so the input must be copied)."""
    return bool(row.params.has_penalties or row.params.logit_bias or row.suppressed_token_ids)


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[N, vocab] processed logits -> [N] int64 token ids (greedy fast path when possible)."""
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if len(greedy) == len(rows):
        return logits.argmax(dim=-1)
    random = [i for i, r in enumerate(rows) if not r.params.greedy]
    token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if greedy:
        idx = _index(greedy, logits.device)
        token_ids[idx] = logits[idx].argmax(dim=-1)
    idx = _index(random, logits.device)
    token_ids[idx] = _sample_random(logits[idx], [rows[i] for i in random])
    return token_ids


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, filters and the exponential race. logits: [R, vocab] -> [R] int64.

    Filtered-out tokens get probability 0; the rows are not renormalised afterwards because
    argmax(probs / E) does not change when a row is scaled.
    """
    logits = logits / _column([r.params.temperature for r in rows], logits)
    if any(r.params.top_k_enabled for r in rows):
        logits = _apply_top_k(logits, rows)
    probs = logits.softmax(dim=-1)  # renormalised over what top-k kept
    if any(r.params.top_p < 1.0 for r in rows):
        probs = _apply_top_p(probs, rows)
    if any(r.params.min_p > 0.0 for r in rows):
        probs = _apply_min_p(probs, rows)
    return exponential_race(probs, _step_seeds(rows, probs))


# NOTE: the filters keep every token tied with the last one kept (threshold semantics), so the
# result never depends on how a sort or topk orders equal values (common with bf16 logits),
# and hence not on the other rows of the batch.


def _apply_top_k(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """-inf for logits [R, vocab] below each row's k-th largest value; rows without top-k are
    left alone (and do not widen the topk, which would then cost a full sort)."""
    ks = [top_k_width(r.params, logits.shape[1]) for r in rows]
    top = logits.topk(max(ks), dim=-1, sorted=True).values
    return keep_top_k(logits, top, _column(ks, logits))


def top_k_width(params: SamplingParams, vocab: int) -> int:
    """How many tokens the row's top-k keeps; 0 when it has none."""
    return min(params.top_k, vocab) if params.top_k_enabled else 0


def keep_top_k(logits: torch.Tensor, ordered: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """logits [R, vocab] with -inf below each row's k-th largest value. ordered: [R, W] the
    row's largest logits in descending order (W >= max k); ks: [R, 1] int64, 0 = no top-k."""
    kth = ordered.gather(1, (ks - 1).clamp_min(0))
    kth = kth.masked_fill(ks == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Zero probs [R, vocab] outside each row's nucleus: the most likely tokens, taken in
    descending order while the mass before them is below top_p (so at least one is kept)."""
    vocab = probs.shape[1]
    # Only the sorted values matter. When every row has top-k, at most max(k) distinct
    # positions can be kept, so a topk replaces the full sort.
    width = max(r.params.top_k for r in rows) if all(r.params.top_k_enabled for r in rows) else 0
    if 0 < width < vocab:
        ordered = probs.topk(width, dim=-1, sorted=True).values
    else:
        ordered = probs.sort(dim=-1, descending=True).values
    return keep_nucleus(probs, ordered, _column([r.params.top_p for r in rows], probs))


def keep_nucleus(probs: torch.Tensor, ordered: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero, in place, probs [R, vocab] outside each row's nucleus. ordered: [R, W] the
    row's largest probabilities in descending order (W >= what the nucleus can hold);
    top_p: [R, 1] float32."""
    mass_before = ordered.cumsum(dim=-1) - ordered
    # top_p == 1 keeps everything: cumsum rounding could otherwise drop a far tail.
    drop = (mass_before >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    smallest_kept = ordered.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)
    return probs.masked_fill_(probs < smallest_kept, 0.0)


def _apply_min_p(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    return keep_min_p(probs, _column([r.params.min_p for r in rows], probs))


def keep_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero, in place, probs [R, vocab] below min_p [R, 1] * the row's max (scale-free, so
    no renormalising; min_p 0 keeps every token)."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return probs.masked_fill_(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """[R] int64: argmax(probs / E) with E ~ Exp(1) drawn from seeds [R] int64; probs
    [R, vocab] is overwritten."""
    return probs.div_(exponential_noise(seeds, probs.shape[1])).argmax(dim=-1)


def draw_step_seed(generator: torch.Generator) -> torch.Tensor:
    """One int64 from the row's own generator (a 0-dim tensor on its device): the seed of
    this step's noise."""
    seed = torch.empty((), dtype=torch.int64, device=generator.device)
    return seed.random_(generator=generator)


def _step_seeds(rows: list[SamplingRow], like: torch.Tensor) -> torch.Tensor:
    """[R] int64 on like's device: each row's seed for this step (`draw_step_seed`)."""
    seeds = [draw_step_seed(r.generator) for r in rows]
    return torch.stack(seeds).to(like.device, non_blocking=True)


# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 wraps the same).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def exponential_noise(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 Exp(1) noise, row i a pure function of ``seeds[i]`` ([R] int64).

    Counter-based: element j is splitmix64 output j of the row's seed, computed on the seeds'
    device in a few vectorised integer ops. Drawing ``vocab`` values per row from a CPU
    generator instead costs milliseconds per row per step plus a host-to-device copy.
    """
    col = torch.arange(1, vocab + 1, dtype=torch.int64, device=seeds.device)
    z = seeds.unsqueeze(1) + col * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    # Top 53 bits -> uniform in (0, 1), never 0 or 1, so E = -log(u) is finite and > 0. Float64
    # keeps E's resolution near 0 (~1e-16; float32 would stop at ~6e-8), where it decides
    # whether tokens of tiny probability can ever win.
    u = (_shr(z, 11).double() + 0.5) * 2.0**-53
    return u.log_().neg_().float()


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Apply repetition, frequency and presence penalties in place to logits [N, vocab]."""
    penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not penalised:
        return
    sub = [rows[i] for i in penalised]
    idx = _index(penalised, logits.device)
    x = logits[idx]
    vocab = x.shape[1]
    out_counts = _token_counts([r.output_token_ids for r in sub], vocab, x)
    seen = (out_counts > 0) | (_token_counts([r.prompt_token_ids for r in sub], vocab, x) > 0)
    rep = _column([r.params.repetition_penalty for r in sub], x)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x -= _column([r.params.frequency_penalty for r in sub], x) * out_counts
    x -= _column([r.params.presence_penalty for r in sub], x) * (out_counts > 0)
    logits[idx] = x


def _token_counts(
    seqs: list[Sequence[int] | torch.Tensor], vocab: int, like: torch.Tensor
) -> torch.Tensor:
    """[R, vocab] float32 occurrence counts of each row's token ids, on ``like``'s device.

    A history may be a CPU int64 tensor: the engine can keep the prompt as one, which skips
    converting hundreds of Python ints per row per step.
    """
    # One flat host tensor and one copy for the whole batch, not one per row.
    flat = torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs])
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    assert flat.numel() == 0 or (int(flat.min()) >= 0 and int(flat.max()) < vocab), "bad id"
    rows = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=like.device)
    index = (rows.to(like.device, non_blocking=True), flat.to(like.device, non_blocking=True))
    ones = torch.ones(flat.numel(), dtype=torch.float32, device=like.device)
    return counts.index_put_(index, ones, accumulate=True)


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Add each row's ``logit_bias`` in place to logits [N, vocab]: one scatter over the
    entries of the rows that have any, so rows without a bias cost nothing."""
    entries = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if not entries:
        return
    row_idx = torch.tensor([i for i, _, _ in entries], dtype=torch.long)
    tok_idx = torch.tensor([t for _, t, _ in entries], dtype=torch.long)
    assert int(tok_idx.max()) < logits.shape[1], "logit_bias id outside the vocabulary"
    bias = torch.tensor([b for _, _, b in entries], dtype=logits.dtype)
    index = (row_idx.to(logits.device), tok_idx.to(logits.device))
    logits.index_put_(index, bias.to(logits.device), accumulate=True)


def _apply_suppression(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Set each row's suppressed token ids to -inf in place; logits: [N, vocab]."""
    pairs = [(i, t) for i, r in enumerate(rows) for t in r.suppressed_token_ids]
    if not pairs:
        return
    row_idx, tok_idx = torch.tensor(pairs, dtype=torch.long).to(logits.device).unbind(dim=1)
    logits[row_idx, tok_idx] = float("-inf")


def logprobs_for_rows(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]
) -> TokenLogprobs | None:
    """Logprobs of token_ids [N] under raw_logits [N, vocab], with the largest top-N any
    row asked for; None when no row asked."""
    asked = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    if not asked:
        return None
    return compute_logprobs(raw_logits, token_ids, max(asked))


def _column(values: list[float] | list[int], like: torch.Tensor) -> torch.Tensor:
    """[R, 1] tensor of per-row values on ``like``'s device, for broadcasting over vocab."""
    dtype = torch.long if isinstance(values[0], int) else torch.float32
    return torch.tensor(values, dtype=dtype).to(like.device, non_blocking=True).unsqueeze(1)


def _index(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long).to(device, non_blocking=True)
