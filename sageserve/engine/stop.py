"""Stop strings over incrementally decoded text.

A stop string may span several tokens, so each check looks at the new characters plus enough
of the older text for a stop string to end inside the new part. As in vLLM and SGLang, the
stop string itself is not part of the output: the caller truncates the text where it starts.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Finds the user's stop strings in a growing output text."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self.stop = tuple(stop)
        self._max_len = max((len(s) for s in self.stop), default=0)

    def check(self, text: str, new_text_len: int) -> int | None:
        """Index in ``text`` where the earliest stop string starts, or None.

        Only occurrences that end inside the last ``new_text_len`` characters count: older
        ones were seen by earlier calls. When several match, the one starting first wins.
        """
        found = self.find(text, new_text_len)
        return None if found is None else found[0]

    def find(self, text: str, new_text_len: int) -> tuple[int, str] | None:
        """Like ``check``, but also returns which stop string matched (for ``stop_reason``).

        On a tie in start index the longer stop string wins, since it is the one that ended
        inside the new text when the shorter one had ended before.
        """
        if not self.stop or new_text_len <= 0:
            return None
        new_start = len(text) - min(new_text_len, len(text))
        best: tuple[int, str] | None = None
        for s in self.stop:
            # Earliest start for an occurrence ending at or after new_start.
            pos = text.find(s, max(0, new_start - len(s) + 1))
            if pos != -1 and (best is None or (pos, -len(s)) < (best[0], -len(best[1]))):
                best = (pos, s)
        return best

    def holdback(self, text: str) -> int:
        """How many trailing characters of ``text`` to withhold while streaming.

        That is the longest suffix of ``text`` that is a proper prefix of some stop string:
        the next tokens could complete it, and then it must never have been sent.
        """
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
