"""Live signals per served version: what the gateway counts of each request (requests, errors,
latency, tokens, the task's cheap output checks), over windows that two versions share, written
as Prometheus' text format and as the figures of a summary.

Pure: no Ray, MLflow or Prefect (`live_export` reads the contracts and writes the summaries), so
unit tests check every rule with a clock of their own. Memory is bounded: a `Tally` is fixed-size
counts (latency in fixed histogram buckets, labels from the version's own label list), the
store keeps at most `max_versions` versions and the slots of one window.

Windows are differences of counts: a `Tally` subtracts, so `since(mark())` is exactly what two
versions answered from one instant on (a staged rollout's step compares them on it), and
`recent()` is the last `window_s` seconds within a slot."""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field, fields

from prefect_lora.deploy.languages import other_language

LATENCY_BOUNDS_S: tuple[float, ...] = tuple(round(m * 10.0**e, 6) for e in range(-3, 3) for m in (1, 1.5, 2, 3, 5, 7.5))
"""Upper bounds of the latency buckets, 1 ms to 750 s (neighbours at most 5/3 apart: a quantile
read off them is within that factor, closer by interpolation); one more bucket holds the rest."""


@dataclass(frozen=True)
class AnswerContract:
    """What a version's answers must be: a JSON object holding `required_fields` when `json`
    (the registered settings' `answer_format`, from `evaluation.generation.metric: json`)."""

    json: bool = False
    required_fields: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: dict) -> AnswerContract:
        if settings.get("answer_format") != "json":
            return cls()
        return cls(True, tuple(str(f) for f in settings.get("required_fields") or ()))


def _zeros() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS_S) + 1)


@dataclass
class Tally:
    """Counts of one version's requests; adds and subtracts field by field."""

    requests: int = 0
    """Requests routed to the version: answered, failed, or refused as the client's fault."""
    errors: int = 0
    """Answered 5xx: the model failed or the request timed out."""
    client_errors: int = 0
    """Answered 4xx after naming the version (e.g. a prompt over the token limit): the client's."""
    latency: list[int] = field(default_factory=_zeros)
    """Answered and failed requests per `LATENCY_BOUNDS_S` bucket (client errors left out)."""
    latency_sum_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: int = 0
    """Generated answers (a request of several prompts has several)."""
    empty: int = 0
    """Generated answers of nothing but whitespace."""
    truncated: int = 0
    """Generated answers cut at `max_tokens` (finish_reason `length`)."""
    unfinished: int = 0
    """Generated answers that ended by themselves mid-sentence (`stopped_mid_sentence`)."""
    json_checked: int = 0
    """Generated answers of a version whose answers must be JSON objects."""
    json_invalid: int = 0
    """... that are no JSON object."""
    fields_missing: int = 0
    """... that are a JSON object lacking a required field."""
    off_prompt: int = 0
    """Generated answers off their prompt (`off_prompt`): clearly in another language, or (a JSON
    version) a JSON object none of whose text values is drawn from the prompt."""
    failed_checks: int = 0
    """Generated answers that fail their version's checks: no JSON object or a field missing
    (a JSON version), empty (any other). A truncated answer is not a failure: the client's
    `max_tokens` decides it."""
    labels: Counter = field(default_factory=Counter)
    """Classified texts per label."""

    def _combine(self, other: Tally, sign: int) -> Tally:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, list):
                out[f.name] = [x + sign * y for x, y in zip(a, b)]
            elif isinstance(a, Counter):
                out[f.name] = Counter({k: n for k in a.keys() | b.keys() if (n := a[k] + sign * b[k])})
            else:
                out[f.name] = a + sign * b
        return Tally(**out)

    def __add__(self, other: Tally) -> Tally:
        return self._combine(other, 1)

    def __sub__(self, other: Tally) -> Tally:
        return self._combine(other, -1)

    @property
    def served(self) -> int:
        """Requests the version answered or failed (client errors left out): the error rate's denominator."""
        return self.requests - self.client_errors

    @property
    def classified(self) -> int:
        return sum(self.labels.values())


def _json_object(text: str) -> dict | None:
    """The answer as evaluation reads `metric: json` (`score_json`): the stripped text parsed as a
    JSON object, or None."""
    try:
        got = json.loads(text.strip())
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def _json_problem(got: dict | None, required: tuple[str, ...]) -> str | None:
    if got is None:
        return "invalid"
    return "missing" if any(f not in got for f in required) else None


def json_answer_problem(text: str, required: tuple[str, ...]) -> str | None:
    """Why an answer breaks a JSON contract (`invalid`, `missing`), or None."""
    return _json_problem(_json_object(text), required)


def off_prompt(prompt: str, answer: str, contract: AnswerContract = AnswerContract()) -> bool:
    """Whether an answer drifted off its prompt where no other check sees it: written in another
    language than the prompt (`languages.other_language`), or, for a JSON version, a JSON object
    with text values none of which occurs in the prompt (an extraction that translated or made up
    what it should copy). A rate of it means little alone (a translation task answers in another
    language by design); a staged rollout compares it between two versions on the same traffic."""
    return _off_prompt(prompt, answer, _json_object(answer) if contract.json else None)


def _off_prompt(prompt: str, answer: str, got: dict | None) -> bool:
    """`off_prompt`, given the answer's JSON object (None: no JSON contract, or no object)."""
    if other_language(prompt, answer):
        return True
    values = [v.strip().lower() for v in (got or {}).values() if isinstance(v, str) and v.strip()]
    asked = prompt.lower()
    return bool(values) and not any(v in asked for v in values)


def stopped_mid_sentence(text: str) -> bool:
    """Whether an answer that ended by itself stops mid-sentence: its last character a letter (of
    any script), or a comma, colon, dash or opening bracket. An adapter that emits its end token too
    early cuts its answers so, under `max_tokens`, where `truncated` does not see it. A rate of it
    means little alone (a short answer, "Paris", ends in a letter); a staged rollout compares it
    between two versions on the same traffic."""
    tail = text.rstrip()
    return bool(tail) and (tail[-1].isalpha() or tail[-1] in ",;:-\u2013\u2014([{")


def answered(result: dict, latency_s: float, contract: AnswerContract = AnswerContract(),
             prompts: list[str] | None = None) -> Tally:
    """The counts one answered request adds: a generation (`texts`, `finish`, token counts) or a
    classification (`labels`); `prompts`: the user's text of each generated answer, where known."""
    t = Tally(requests=1, latency_sum_s=latency_s, prompt_tokens=int(result.get("prompt_tokens", 0)),
              completion_tokens=int(result.get("completion_tokens", 0)), labels=Counter(result.get("labels") or []))
    t.latency[bisect_left(LATENCY_BOUNDS_S, latency_s)] += 1
    texts = result.get("texts") or []
    for text, finish, prompt in zip(texts, result.get("finish") or [], prompts or [None] * len(texts)):
        got = _json_object(text) if contract.json else None  # parsed once for both checks
        t.generated += 1
        t.off_prompt += prompt is not None and _off_prompt(prompt, text, got)
        t.empty += not text.strip()
        t.truncated += finish == "length"
        t.unfinished += finish == "stop" and stopped_mid_sentence(text)
        if contract.json:
            problem = _json_problem(got, contract.required_fields)
            t.json_checked += 1
            t.json_invalid += problem == "invalid"
            t.fields_missing += problem == "missing"
            t.failed_checks += problem is not None
        else:
            t.failed_checks += not text.strip()
    return t


def failed(status: int, latency_s: float) -> Tally:
    """The counts one request answered with an error adds: a 5xx is the version's, a 4xx the client's."""
    if status < 500:
        return Tally(requests=1, client_errors=1)
    t = Tally(requests=1, errors=1, latency_sum_s=latency_s)
    t.latency[bisect_left(LATENCY_BOUNDS_S, latency_s)] += 1
    return t


def quantile(counts: list[int], q: float) -> float | None:
    """The `q` quantile of latencies counted per `LATENCY_BOUNDS_S` bucket, interpolated within
    its bucket as Prometheus' `histogram_quantile` does (past the last bound: that bound); None
    for no counts."""
    total = sum(counts)
    if not total:
        return None
    rank, below = q * total, 0
    for i, n in enumerate(counts):
        if n and below + n >= rank:
            if i == len(LATENCY_BOUNDS_S):
                return LATENCY_BOUNDS_S[-1]
            low = LATENCY_BOUNDS_S[i - 1] if i else 0.0
            return low + (LATENCY_BOUNDS_S[i] - low) * max(rank - below, 0) / n
        below += n
    return LATENCY_BOUNDS_S[-1]


class SignalStore:
    """Counts per served version (`NAME/VERSION`) since the start, and per slot of `window_s /
    slots` seconds for the recent window; requests refused before they named a version (auth,
    body, an unknown alias or version) are counted apart, by status."""

    def __init__(self, window_s: float = 300.0, slots: int = 30, max_versions: int = 256, clock=time.monotonic):
        self.window_s, self.slot_s, self.max_versions, self.clock = window_s, window_s / slots, max_versions, clock
        self.started = clock()
        self.totals: dict[str, Tally] = {}
        self.rejected: Counter = Counter()
        self._born: dict[str, int] = {}  # when each version's totals started (a count of starts): see `since`
        self._starts = itertools.count()
        self._slots: deque[tuple[float, dict[str, Tally]]] = deque(maxlen=slots + 1)

    def add(self, key: str | None, tally: Tally, status: int = 200) -> None:
        """Count one request. With no version (`key` None), or a 404 (the version it named does
        not exist), it counts as refused by `status`."""
        if key is None or status == 404:
            self.rejected[status] += 1
            return
        if key not in self.totals:
            self._born[key] = next(self._starts)
        self.totals[key] = self.totals.pop(key, Tally()) + tally  # latest last: the oldest goes past the bound
        if len(self.totals) > self.max_versions:
            self._born.pop(gone := next(iter(self.totals)))
            self.totals.pop(gone)
        slot = self._slot()
        slot[key] = slot.get(key, Tally()) + tally

    def _slot(self) -> dict[str, Tally]:
        start = self.started + (self.clock() - self.started) // self.slot_s * self.slot_s
        if not self._slots or self._slots[-1][0] != start:
            self._slots.append((start, {}))
        return self._slots[-1][1]

    def recent(self) -> tuple[float, dict[str, Tally]]:
        """The seconds the recent window spans (at most `window_s`; less right after the start)
        and each version's counts in it (whole slots)."""
        now = self.clock()
        since = max(now - self.window_s, self.started)
        out: dict[str, Tally] = {}
        for start, slot in self._slots:
            if start >= since - 1e-9:
                for key, tally in slot.items():
                    out[key] = out.get(key, Tally()) + tally
        return now - since, out

    def mark(self) -> dict[str, tuple[int, Tally]]:
        """The counts now, for `since`: a window that starts at this instant for every version."""
        return {key: (self._born[key], tally + Tally()) for key, tally in self.totals.items()}

    def since(self, mark: dict[str, tuple[int, Tally]]) -> dict[str, Tally]:
        """Each version's counts from `mark` on (versions with none left out; one dropped past
        `max_versions` and counted again since counts from its return)."""
        out = {}
        for key, tally in self.totals.items():
            born, before = mark.get(key, (None, Tally()))
            if (diff := tally - before if born == self._born[key] else tally).requests:
                out[key] = diff
        return out


# ----------------------------------------------------------------------------- summaries


def figures(t: Tally) -> dict[str, float]:
    """A window's figures of one version: counts, rates, latency quantiles (seconds), and the
    output checks that apply (generation, JSON contract, label shares)."""
    out: dict[str, float] = {"requests": t.requests, "errors": t.errors, "client_errors": t.client_errors,
                             "error_rate": t.errors / t.served if t.served else 0.0,
                             "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens}
    for name, q in (("latency_p50_s", 0.5), ("latency_p95_s", 0.95)):
        if (value := quantile(t.latency, q)) is not None:
            out[name] = value
    if t.generated:
        out.update(answers=t.generated, empty_rate=t.empty / t.generated, truncated_rate=t.truncated / t.generated,
                   unfinished_rate=t.unfinished / t.generated,
                   check_failure_rate=t.failed_checks / t.generated, off_prompt_rate=t.off_prompt / t.generated)
    if t.json_checked:
        out.update(json_invalid_rate=t.json_invalid / t.json_checked, fields_missing_rate=t.fields_missing / t.json_checked)
    for label, n in sorted(t.labels.items()):
        out[f"label_share/{_metric_safe(label)}"] = n / t.classified
    return out


def _metric_safe(text: str) -> str:
    """`text` in the characters an MLflow metric key allows."""
    return re.sub(r"[^\w.\- ]", "_", text)[:100] or "_"


def summary_line(f: dict[str, float], seconds: float) -> str:
    """One line of a version's figures over the last `seconds`, as the MLflow version page shows it."""
    n = f["requests"]
    parts = [f"{n:.0f} request{'s' * (n != 1)} in the last {seconds:.0f} s", f"errors {f['error_rate']:.1%}"]
    if "latency_p95_s" in f:
        parts.append(f"latency p50 {f['latency_p50_s']:.3g} s, p95 {f['latency_p95_s']:.3g} s")
    if "check_failure_rate" in f:
        parts.append(f"failed output checks {f['check_failure_rate']:.1%} of {f['answers']:.0f} answer{'s' * (f['answers'] != 1)}")
    if "json_invalid_rate" in f:
        parts.append(f"no JSON object {f['json_invalid_rate']:.1%}, fields missing {f['fields_missing_rate']:.1%}")
    if "truncated_rate" in f:
        parts.append(f"cut at max_tokens {f['truncated_rate']:.1%}, stopped mid-sentence {f['unfinished_rate']:.1%}")
    if f.get("off_prompt_rate"):
        parts.append(f"off the prompt (another language, or no value from it) {f['off_prompt_rate']:.1%}")
    if shares := {k.split("/", 1)[1]: v for k, v in f.items() if k.startswith("label_share/")}:
        parts.append("labels " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- Prometheus text format

PREFIX = "prefect_lora_"
_COUNTERS = (  # (name, Tally field, help)
    ("requests_total", "requests", "Requests routed to the version: answered, failed, or refused as the client's fault."),
    ("request_errors_total", "errors", "Requests the version answered 5xx: the model failed or the request timed out."),
    ("client_errors_total", "client_errors", "Requests that named the version and were refused 4xx (the client's fault)."),
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of answered requests."),
    ("completion_tokens_total", "completion_tokens", "Generated tokens of answered requests."),
    ("answers_total", "generated", "Generated answers (one per prompt)."),
    ("answers_empty_total", "empty", "Generated answers of nothing but whitespace."),
    ("answers_truncated_total", "truncated", "Generated answers cut at max_tokens (finish_reason length)."),
    ("answers_unfinished_total", "unfinished", ("Generated answers that ended by themselves mid-sentence "
                                                "(last character a letter, a comma, colon, dash or opening bracket).")),
    ("answers_json_checked_total", "json_checked", "Generated answers of a version whose answers must be JSON objects."),
    ("answers_json_invalid_total", "json_invalid", "Answers of a JSON version that are no JSON object."),
    ("answers_fields_missing_total", "fields_missing", "Answers of a JSON version that lack a required field."),
    ("answers_off_prompt_total", "off_prompt", ("Generated answers off their prompt: clearly in another language, "
                                                 "or a JSON object with no text value drawn from the prompt.")),
    ("answers_failed_checks_total", "failed_checks", ("Generated answers failing their version's output checks "
                                                      "(no JSON object or a field missing; empty for plain text).")),
)


def _labels(**labels: str) -> str:
    text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return f"{{{text}}}" if text else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(x: float) -> str:
    return "+Inf" if x == math.inf else repr(float(x)) if isinstance(x, float) else str(x)


def _family(name: str, kind: str, text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}", *samples]


def exposition(store: SignalStore, export_failures: dict[str, int] | None = None) -> str:
    """Every counter of `store` in Prometheus' text exposition format (0.0.4), labelled by model
    and version, with the latency histogram and the recent window's p50/p95."""
    versions = [(dict(zip(("model", "version"), key.rsplit("/", 1))), t) for key, t in sorted(store.totals.items())]
    lines: list[str] = []
    for name, attr, text in _COUNTERS:
        lines += _family(name, "counter", text, [f"{PREFIX}{name}{_labels(**v)} {getattr(t, attr)}" for v, t in versions])
    lines += _family("classified_total", "counter", "Classified texts per label.",
                     [f"{PREFIX}classified_total{_labels(**v, label=lab)} {n}"
                      for v, t in versions for lab, n in sorted(t.labels.items())])
    lines += _family("request_duration_seconds", "histogram",
                     "Seconds from a request's arrival to its answer (answered and 5xx requests).",
                     [line for v, t in versions for line in _histogram("request_duration_seconds", v, t)])
    _, recent = store.recent()
    lines += _family("request_duration_window_seconds", "gauge",
                     f"Latency quantiles over the last {store.window_s:g} s (signals_window_s), read off the histogram.",
                     [f"{PREFIX}request_duration_window_seconds{_labels(**v, quantile=str(q))} {_number(value)}"
                      for v, t in versions for q in (0.5, 0.95)
                      if (value := quantile(recent.get(f"{v['model']}/{v['version']}", Tally()).latency, q)) is not None])
    lines += _family("rejected_requests_total", "counter",
                     "Requests refused before they named a served version (auth, body, unknown model, alias or version).",
                     [f"{PREFIX}rejected_requests_total{_labels(status=str(s))} {n}" for s, n in sorted(store.rejected.items())])
    lines += _family("signals_export_failures_total", "counter",
                     ("Summaries, a rollout's records and events (or answer contracts) that could not be "
                      "written to (read from) a sink."),
                     [f"{PREFIX}signals_export_failures_total{_labels(sink=s)} {n}"
                      for s, n in sorted((export_failures or {}).items())])
    return "\n".join(lines) + "\n"


def _histogram(name: str, labels: dict[str, str], t: Tally) -> list[str]:
    out, below = [], 0
    for bound, n in zip((*LATENCY_BOUNDS_S, math.inf), t.latency):
        below += n
        out.append(f"{PREFIX}{name}_bucket{_labels(**labels, le=_number(bound))} {below}")
    return [*out, f"{PREFIX}{name}_sum{_labels(**labels)} {_number(t.latency_sum_s)}",
            f"{PREFIX}{name}_count{_labels(**labels)} {below}"]
