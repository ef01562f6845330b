"""Verdict profiles: the bars a backend is judged by, chosen by the precision of its attention.

- "16bit" (exact and 16-bit attention): SGLang's rule for attention backends, per token --
  |Δ logprob| of the next token < `logprob_delta` on a share >= `logprob_delta_quantile` of
  the tokens -- with the mean KL < `mean_kl` and |Δ perplexity| < `ppl_delta_rel`.
- "8bit" (quantized attention): no 8-bit attention meets the per-token rule (its codes move
  every logprob a little: 80-85% of SmolLM2's tokens within 5e-2), so it is judged on the
  distribution: the upper end of the mean KL's confidence interval < `mean_kl` (SGLang's KL
  bound), both ends of the perplexity change's interval within ±`ppl_delta_rel`, the upper
  end of the top-1 agreement's (Wilson) interval >= `min_top1` (a short context's few
  near-tie flips are noise, not a failure), MMLU answer changes not significant (McNemar's
  exact test at `mcnemar_alpha`); determinism must be identical as for 16-bit. The per-token
  share is still measured and shown.

`--verdict-profile auto` (default) takes each backend's own profile (its registered
`attention_bits`; a server whose backend is not registered here is taken as 16-bit, and
labelled so). Forcing one profile on every backend is allowed and labelled wherever it
differs from the backend's precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sageserve.attention.registry import backend_entry, backend_names
from sageserve.validate.config import PROFILE_CHOICES

RULES = {
    "16bit": "SGLang's per-token rule: share of |Δ logprob| < logprob_delta >= "
    "logprob_delta_quantile; mean KL < mean_kl; |Δ perplexity| < ppl_delta_rel",
    "8bit": "quantized-attention bars: upper CI of the mean KL < mean_kl; perplexity change "
    "CI within ±ppl_delta_rel; upper CI of the top-1 agreement >= min_top1; MMLU flips not "
    "significant (McNemar, mcnemar_alpha); the per-token share shown, not judged",
}


@dataclass(frozen=True)
class ProfileChoice:
    """The profile judging one backend label, and why.

    precision: the backend's own ("16bit", "8bit", or "unknown" for a server whose backend
    is not registered here); forced: chosen by --verdict-profile rather than the precision.
    """

    profile: str
    precision: str
    backend: str | None
    forced: bool

    @property
    def note(self) -> str:
        """A label for check names when the profile is not the backend's own ("" if it is)."""
        if self.precision == "unknown":
            return f" [{self.profile} profile: backend {self.backend!r} unknown here]"
        if self.profile != self.precision:
            return f" [{self.profile} profile forced on a {self.precision} backend]"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rules": RULES[self.profile], "note": self.note.strip(" []")}


def backend_precision(backend: str | None) -> str:
    """ "8bit" or "16bit" as the backend registered itself; "unknown" if it is not registered."""
    if backend is None or backend not in backend_names():
        return "unknown"
    return f"{backend_entry(backend).attention_bits}bit"


def choose_profiles(backends: dict[str, str | None], requested: str) -> dict[str, ProfileChoice]:
    """label -> ProfileChoice. backends: label -> attention backend name (None: unknown).
    ValueError names the valid choices for a bad `requested`."""
    if requested not in PROFILE_CHOICES:
        choices = ", ".join(PROFILE_CHOICES)
        raise ValueError(f"--verdict-profile {requested!r}: choose from {choices}")
    out = {}
    for label, backend in backends.items():
        precision = backend_precision(backend)
        if requested == "auto":
            profile = "16bit" if precision == "unknown" else precision
        else:
            profile = requested
        out[label] = ProfileChoice(profile, precision, backend, forced=requested != "auto")
    return out
