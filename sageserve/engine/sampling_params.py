"""Per-request sampling parameters, validated on construction.

Names and defaults follow SGLang (``max_new_tokens=128``, ``min_p``, ``logprob_start_len``);
penalties follow vLLM: ``repetition_penalty`` is the HF/CTRL divide-or-multiply penalty over
prompt + output tokens, ``frequency_penalty`` / ``presence_penalty`` are OpenAI's additive
penalties over output tokens only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Largest top-N accepted for ``logprobs`` and ``prompt_logprobs``. OpenAI caps ``top_logprobs``
# at 20; a larger N would make every step's top-k over the vocabulary and the response grow.
max_top_logprobs = 20

# Temperatures at or below this are treated as greedy: dividing logits by a tinier value
# overflows float32 to inf and turns the softmax into NaNs (vLLM uses the same epsilon).
GREEDY_TEMPERATURE_EPS = 1e-5

# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1

_PENALTY_LIMIT = 2.0

# Every step of a request checks its new text against each stop string and holds back a
# tail that could still become one, so their number and length bound the per-step cost
# (100,000 stop strings stalled a stream for 7 s). OpenAI allows 4 stop strings.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024

# Every step of a request builds and scatters one value per entry into its logits row (host
# work on the engine's loop, which serves the whole batch), so the count bounds what one
# request can add to every step; banning or favouring a few words needs far fewer.
MAX_LOGIT_BIAS_ENTRIES = 1024
# OpenAI's range: -100 bans a token, +100 all but forces it.
LOGIT_BIAS_LIMIT = 100.0
# A key as OpenAI's JSON sends it ("50256"). Bounded so int() never parses a huge string
# (CPython refuses over 4300 digits with a less helpful message).
_TOKEN_ID_STRING = re.compile(r"-?[0-9]{1,20}")


def _fail(field: str, value: Any, allowed: str, entry: bool = False) -> None:
    what = (
        f"SamplingParams.{field} entry {value!r}" if entry else f"SamplingParams.{field}={value!r}"
    )
    raise ValueError(f"{what} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    ``temperature=0`` means greedy (argmax); ``top_k`` of -1 or 0 disables top-k;
    ``max_new_tokens=0`` means prefill only (e.g. for prompt logprobs), no token generated.
    ``logprobs`` / ``prompt_logprobs`` ask for the top-N (at most ``max_top_logprobs``)
    log-probabilities of the model's raw distribution per output / prompt token, plus the
    chosen token; 0 means the chosen token only and None turns them off.

    ``logit_bias`` is OpenAI's parameter: a bias in [-100, 100] added to a token's logit
    after the penalties (so it changes greedy requests too: -100 bans a token, +100 all but
    forces it). Accepted as a dict ``{token_id: bias}`` whose keys may also be decimal strings
    (``{"50256": -100}``, as OpenAI's JSON sends them) or as a sequence of ``(id, bias)``
    pairs; stored as ``(id, bias)`` pairs sorted by id, at most ``MAX_LOGIT_BIAS_ENTRIES``.
    Reported logprobs stay those of the raw distribution, unbiased.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_start_len: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        self._normalise_sequences()
        self._validate_sampling()
        self._validate_lengths()
        self._validate_stops()
        self._validate_penalties()
        self._validate_logprobs()
        self._validate_logit_bias()

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the (penalised) logits, with no noise."""
        return self.temperature <= GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        """True when any repetition / frequency / presence penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    def _normalise_sequences(self) -> None:
        # The dataclass is frozen, so normalised values go in through object.__setattr__.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple):
            _fail("stop", stop, "must be a string, a list of strings or None")
        object.__setattr__(self, "stop", tuple(stop))
        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, list | tuple):
            _fail("stop_token_ids", ids, "must be a list of non-negative token ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))

    def _validate_sampling(self) -> None:
        t = self.temperature
        if not _is_real(t) or t < 0:
            _fail("temperature", t, "must be a finite number >= 0 (0 means greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", self.top_p, "must be a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", self.top_k, "must be an integer >= 1, or -1 / 0 to disable top-k")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", self.min_p, "must be a number in [0, 1]")
        s = self.seed
        if s is not None and (not _is_int(s) or not _SEED_MIN <= s <= _SEED_MAX):
            _fail("seed", s, f"must be None or an integer in [{_SEED_MIN}, {_SEED_MAX}]")
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _validate_lengths(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            _fail("max_new_tokens", self.max_new_tokens, "must be an integer >= 0")
        n = self.min_new_tokens
        if not _is_int(n) or not 0 <= n <= self.max_new_tokens:
            _fail("min_new_tokens", n, f"must be an integer in [0, {self.max_new_tokens}]")

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", f"<{len(self.stop)} strings>", f"at most {MAX_STOP_STRINGS} strings")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            count = f"<{len(self.stop_token_ids)} ids>"
            _fail("stop_token_ids", count, f"at most {MAX_STOP_TOKEN_IDS} ids")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                _fail("stop", s, "stop strings must be non-empty strings", entry=True)
            if len(s) > MAX_STOP_STRING_CHARS:
                _fail("stop", s[:20] + "...", f"at most {MAX_STOP_STRING_CHARS} characters", True)
        for i in self.stop_token_ids:
            if not _is_int(i) or i < 0:
                _fail("stop_token_ids", i, "token ids must be integers >= 0", entry=True)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")

    def _validate_penalties(self) -> None:
        r = self.repetition_penalty
        if not _is_real(r) or r <= 0:
            _fail("repetition_penalty", r, "must be a finite number > 0 (1 means off)")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -_PENALTY_LIMIT <= v <= _PENALTY_LIMIT:
                _fail(name, v, "must be a number in [-2, 2] (0 means off)")
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _validate_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= max_top_logprobs):
                _fail(name, v, f"must be None (off) or an integer in [0, {max_top_logprobs}]")
        if not _is_int(self.logprob_start_len) or self.logprob_start_len < 0:
            _fail("logprob_start_len", self.logprob_start_len, "must be an integer >= 0")

    def _validate_logit_bias(self) -> None:
        pairs = self.logit_bias
        seen: set[int] = set()
        for pair in pairs:
            token_id, bias = pair
            if not _is_int(token_id) or token_id < 0:
                _fail("logit_bias", pair, "token ids must be integers >= 0", entry=True)
            if not _is_real(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                _fail("logit_bias", pair, "biases must be finite numbers in [-100, 100]", True)
            # {5: 1, "5": 2} names one token twice; picking either bias would be a guess.
            if token_id in seen:
                _fail("logit_bias", token_id, "each token id may appear once", entry=True)
            seen.add(token_id)
        normalised = tuple(sorted((token_id, float(bias)) for token_id, bias in pairs))
        object.__setattr__(self, "logit_bias", normalised)


def _logit_bias_pairs(value: Any) -> tuple[tuple[Any, Any], ...]:
    """``logit_bias`` as given -> (id, bias) pairs with string ids parsed; values unchecked."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        _fail("logit_bias", value, "must be a dict {token_id: bias} or a list of pairs")
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        _fail("logit_bias", f"<{len(items)} entries>", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    pairs = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            _fail("logit_bias", item, "entries must be (token_id, bias) pairs", entry=True)
        token_id, bias = item
        if isinstance(token_id, str):
            if not _TOKEN_ID_STRING.fullmatch(token_id):
                allowed = "token ids must be integers >= 0 or strings of decimal digits"
                _fail("logit_bias", token_id, allowed, entry=True)
            token_id = int(token_id)
        pairs.append((token_id, bias))
    return tuple(pairs)
