"""A cheap guess of the language a text is written in, for the live signals' check that an answer
is in its prompt's language (an adapter that drifted into another language still answers valid
JSON, not empty, not cut: no other check sees it).

Two steps, each only where the evidence is clear: the script most of the text's letters are in
(Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai, Hangul, Kana, Han), and for Latin
script the language whose common function words the text holds most (English, German, French,
Spanish, Italian, Portuguese, Dutch). A text it cannot tell (few letters, digits and symbols, a
Latin text with too few function words or two languages close) is None: never counted as a
mismatch. Pure and small: the gateway runs it on every answer."""

from __future__ import annotations

import re
from bisect import bisect_right

_SCRIPTS = (  # (first code point, last code point, script)
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x0370, 0x03FF, "greek"),
    (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"), (0x0600, 0x06FF, "arabic"), (0x0900, 0x097F, "devanagari"),
    (0x0E00, 0x0E7F, "thai"), (0x1E00, 0x1EFF, "latin"), (0x3040, 0x30FF, "kana"), (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"), (0xAC00, 0xD7AF, "hangul"),
)
_STARTS = [start for start, _, _ in _SCRIPTS]

_FUNCTION_WORDS = {
    "en": "the and of to is in that it for was with as on are be this by not you have from or they which an at",
    "de": "der die und das ist nicht den sich mit dem des ein eine auch auf für ich sie es zu im von wir werden wird",
    "fr": "le les et des est une que pas pour dans qui sur au avec du il elle sont nous vous ce cette aux",
    "es": "el los las y que es una por con para del se no su al lo como más pero sus está son muy",
    "it": "il che di della sono non per una con gli è le del nel anche più questo come alla ma ha",
    "pt": "o os que não uma com para do da dos das em é se ao mais mas como foi são está pelo",
    "nl": "de het een en van is dat niet op zijn met voor ook aan er maar wordt bij dit naar",
}
_WORDS = {lang: frozenset(words.split()) for lang, words in _FUNCTION_WORDS.items()}
_TOKEN = re.compile(r"[^\W\d_]+")

MIN_LETTERS = 12
"""Letters a text needs before its script counts."""
MIN_WORDS = 3
"""Function words of the leading language a Latin text needs before its language counts..."""
MARGIN = 2.0
"""... and how many times the runner-up's it must be."""


def script_of(text: str) -> str | None:
    """The script of most of `text`'s letters (at least 60% of them), or None."""
    counts: dict[str, int] = {}
    for ch in text:
        code = ord(ch)
        i = bisect_right(_STARTS, code) - 1
        if i >= 0 and code <= _SCRIPTS[i][1]:
            script = _SCRIPTS[i][2]
            counts[script] = counts.get(script, 0) + 1
    total = sum(counts.values())
    if total < MIN_LETTERS:
        return None
    script, n = max(counts.items(), key=lambda kv: kv[1])
    return script if n >= 0.6 * total else None


def language_of(text: str) -> str | None:
    """`text`'s language where it is clear: a Latin-script language's code (`en`, `de`, ...),
    another script's name (`cyrillic`, `han`, ...), or None."""
    script = script_of(text)
    return _latin_language(text) if script == "latin" else script


def _latin_language(text: str) -> str | None:
    words = _TOKEN.findall(text.lower())
    (best, lang), (second, _) = sorted(((sum(w in vocab for w in words), lang) for lang, vocab in _WORDS.items()),
                                       reverse=True)[:2]
    return lang if best >= MIN_WORDS and best >= MARGIN * second else None


def other_language(prompt: str, answer: str) -> bool:
    """Whether `answer` is clearly in another language than `prompt`: another script, or two
    Latin-script languages both told apart."""
    asked, got = script_of(prompt), script_of(answer)
    if asked is None or got is None:
        return False
    if asked != got:
        return True
    if asked != "latin":
        return False
    asked, got = _latin_language(prompt), _latin_language(answer)
    return asked is not None and got is not None and asked != got
