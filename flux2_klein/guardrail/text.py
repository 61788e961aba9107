"""The prompt blocklist: words, phrases and regular expressions matched on a normalised prompt.

Normalisation defeats the cheap evasions: compatibility forms (full-width letters, ligatures, circled and
mathematical letters: NFKC), case (casefold, so "ß" meets "ss"), accents (combining marks dropped),
invisible characters (format characters such as zero-width spaces, soft hyphens, bidi controls), Cyrillic
and Greek letters that look Latin, and "_" used as a space. Terms are also tried on a leetspeak-folded copy
("l0l1" -> "loli"); patterns are not, since they may mean digits (ages). Words respect boundaries: "cp" does
not match inside "cpu". Spelling a word out with separators ("l.o.l.i") is not caught: that needs a classifier.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Lowercase Cyrillic and Greek letters that pass for Latin ones (after casefold, so uppercase look-alikes
# such as Cyrillic "Н" arrive here as "н").
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ɑ": "a", "ɡ": "g", "ı": "i", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k",
    "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w",
})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_WORD_SEPARATOR = r"[\W_]*"  # between the words of a phrase: spaces, hyphens, dots, or nothing at all
_LINE = re.compile(r"^(?:\[(?P<id>[^\]\s]+)\]\s*)?(?P<body>.*)$")

DEFAULT_BLOCKLIST = "default"  # the name that stands for the shipped list


class BlocklistError(ValueError):
    """A blocklist that cannot be used; the message names the source and line."""


def normalize(text: str) -> str:
    """The form both prompts and blocklist terms are compared in."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if not text.isascii():
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
        text = unicodedata.normalize("NFC", text).translate(_CONFUSABLES)
    return text.replace("_", " ")


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str  # "term" or "pattern"
    text: str  # the term (normalised) or the pattern as written


def parse_blocklist(text: str, source: str) -> list[Rule]:
    """Rules from a blocklist file's text: one per line, `[id] term` or `[id] re:pattern`, the `[id]`
    optional (default `<source>:<line>`); blank lines and lines starting with `#` are skipped."""
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        rule_id, body = m.group("id") or f"{source}:{number}", m.group("body").strip()
        where = f"blocklist {source}, line {number}"
        if body.startswith("re:"):
            pattern = body[3:].strip()
            try:
                re.compile(pattern)
            except re.error as e:
                raise BlocklistError(f"{where}: invalid regular expression {pattern!r}: {e}") from None
            rules.append(Rule(rule_id, "pattern", pattern))
        elif normalize(body).strip():
            rules.append(Rule(rule_id, "term", " ".join(normalize(body).split())))
        else:
            raise BlocklistError(f"{where}: a rule needs a term or `re:<pattern>`; got {raw!r}")
    return rules


def read_blocklist(name: str) -> tuple[str, str]:
    """(source name, text) of a blocklist: DEFAULT_BLOCKLIST (the shipped file) or a path."""
    if name == DEFAULT_BLOCKLIST:
        return name, resources.files(__package__).joinpath("blocklist.txt").read_text(encoding="utf-8")
    path = Path(name)
    if not path.is_file():
        raise BlocklistError(f"blocklists: {name!r} is not a file (give a path, or {DEFAULT_BLOCKLIST!r} "
                             f"for the shipped list)")
    try:
        return path.name, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BlocklistError(f"blocklist {path}: not UTF-8 ({e})") from None


class Blocklist:
    """Compiled rules; `match(prompt)` is the id of the first rule that matches, or None."""

    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)
        terms = [r for r in self.rules if r.kind == "term"]
        self._term_ids = {f"t{i}": r.id for i, r in enumerate(terms)}
        # One alternation for every term (one pass over the prompt); the named group says which matched.
        alternation = "|".join(
            f"(?P<t{i}>{_WORD_SEPARATOR.join(re.escape(w) for w in r.text.split())})" for i, r in enumerate(terms))
        self._terms = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)") if terms else None
        self._patterns = [(r.id, re.compile(r.text, re.IGNORECASE)) for r in self.rules if r.kind == "pattern"]

    @classmethod
    def from_sources(cls, sources: list[tuple[str, str]]) -> Blocklist:
        """From (source name, text) pairs, as read_blocklist returns them."""
        return cls([rule for source, text in sources for rule in parse_blocklist(text, source)])

    def match(self, prompt: str) -> str | None:
        text = normalize(prompt)
        if self._terms is not None:
            folded = text.translate(_LEET)
            for candidate in (text, folded) if folded != text else (text,):
                m = self._terms.search(candidate)
                if m:
                    return self._term_ids[m.lastgroup]
        for rule_id, pattern in self._patterns:
            if pattern.search(text):
                return rule_id
        return None
