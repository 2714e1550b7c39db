"""Token ids -> text as they arrive: incremental detokenization and stop-string matching.

Both are per sequence and run on the host after each step, only for sequences that need text
(stop strings or streaming), so pure-token rollouts (PPO) pay nothing for them.
"""

from __future__ import annotations


class IncrementalText:
    """Text of a growing token list, produced in deltas that never split a UTF-8 character.

    Decoding token by token breaks multi-byte characters that span tokens (byte-level BPE gives
    '\\ufffd' for an incomplete one), so we decode a small window of recent tokens and emit only
    the part after the previously read tokens, holding back while the end is incomplete
    (the prefix/read-offset scheme of HF's TextStreamer and vLLM's detokenizer).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly complete text (possibly '')."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        delta = now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """First stop string in ``text`` that ends after position ``start``: (index, stop) or None.

    ``start`` is where the text was before the latest delta, so each match is found once and a
    stop that straddles two deltas is still seen. Example: find_stop("ab\\nUser:", ["User:"], 3)
    -> (3, "User:").
    """
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (not safe to stream yet).

    Example: held_back("Hello\\nUs", ["\\nUser:"]) -> 3.
    """
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n
