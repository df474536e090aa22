"""The evidence files forgetting reads: a reference corpus (plain text) and multiple-choice
benchmarks (JSONL), read and checked before training, so a missing or malformed one fails first
with an error naming the file, the line and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import PipelineConfig
from ..errors import DataError


def check_evidence_files(cfg: PipelineConfig) -> None:
    """Read every file forgetting will read (the reference corpus, each benchmark) now: a missing
    or malformed one fails before training with the error naming it, not after."""
    ref = cfg.evaluation.reference
    if ref is None:
        return
    if ref.path:
        read_reference_texts(ref.path)
    for path in ref.benchmarks:
        read_mc_benchmark(path)


def _text_lines(p: Path, what: str, missing_fix: str) -> list[str]:
    """The lines of UTF-8 text file `p` (`what` it is, in errors), or a DataError saying the fix."""
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; {missing_fix}")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {p} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None


def read_reference_texts(path: str | Path) -> list[str]:
    """Non-blank lines of a plain-text corpus, stripped (WikiText's blank lines are skipped)."""
    p = Path(path)
    lines = _text_lines(p, "reference corpus", "set evaluation.reference.path to a text file")
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"reference corpus {p} has no non-blank line")
    return texts


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: list[str]
    answer: int
    """0-based index of the right choice."""


def read_mc_benchmark(path: str | Path) -> list[MCQuestion]:
    """A JSONL multiple-choice benchmark: one `{"question", "choices", "answer"}` object per line,
    `answer` the 0-based index of the right choice or its text. Any bad line raises a DataError
    naming the file, the line and the field."""
    p = Path(path)
    lines = _text_lines(p, "benchmark file", "check evaluation.reference.benchmarks")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"benchmark file {p}, line {n}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with question, choices, answer")
        q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string (got {q!r})")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise DataError(f"{where}: field 'choices' must be a list of at least two non-empty strings (got {choices!r})")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer' must be the index (0..{len(choices) - 1}) or the text of one of "
                            f"the choices (got {row.get('answer')!r})")
        out.append(MCQuestion(q.strip(), [c.strip() for c in choices], answer))
    if not out:
        raise DataError(f"benchmark file {p} has no question")
    return out
