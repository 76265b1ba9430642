"""Fact extraction: (subject, relation, object) triples from answers, negation kept.

`PatternExtractor` matches common statement forms in English and Portuguese.
`ModelExtractor` asks the model itself for a triple per sentence, as an
option for statements the patterns miss. Both return `Fact` records whose
names are normalized (lowercase, accents removed, leading articles dropped,
common Portuguese names mapped to English by `knowledge.aliases`), so that
"Austrália" and "Australia", or "Brasil" and "Brazil", name one entity.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from knowledge.aliases import canonical

if TYPE_CHECKING:
    from runtime.backend import Backend

# Relations where one subject has one object: two different objects contradict.
FUNCTIONAL_RELATIONS = frozenset(
    {
        "capital",
        "flows_into",
        "boils_at",
        "freezes_at",
        "answer",
        "largest",
        "smallest",
        "longest",
        "tallest",
        "highest",
        "closest",
        "fastest",
        "hottest",
        "coldest",
        "leg_count",
    }
)
IS_A = "is_a"
KNOWN_RELATIONS = FUNCTIONAL_RELATIONS | {IS_A}

ARTICLES = {"the", "a", "an", "o", "os", "as", "um", "uma", "uns", "umas"}
SUPERLATIVES_EN = {
    "largest": "largest",
    "biggest": "largest",
    "smallest": "smallest",
    "longest": "longest",
    "tallest": "tallest",
    "highest": "highest",
    "closest": "closest",
    "nearest": "closest",
    "fastest": "fastest",
    "hottest": "hottest",
    "coldest": "coldest",
}
SUPERLATIVES_PT = {
    "maior": "largest",
    "menor": "smallest",
    "mais longo": "longest",
    "mais alto": "tallest",
    "mais proximo": "closest",
    "mais rapido": "fastest",
    "mais quente": "hottest",
    "mais frio": "coldest",
}
NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "twelve": 12,
    "um": 1,
    "uma": 1,
    "dois": 2,
    "duas": 2,
    "tres": 3,
    "quatro": 4,
    "cinco": 5,
    "seis": 6,
    "sete": 7,
    "oito": 8,
    "nove": 9,
    "dez": 10,
}
PATTERN_CONFIDENCE = 0.9
IS_A_CONFIDENCE = 0.6  # "X is a Y" also matches descriptions that are not taxonomy
MODEL_CONFIDENCE = 0.5
MAX_SENTENCES = 50  # per answer; a 100,000-character answer is not read to the end


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    negated: bool
    confidence: float
    sentence: str
    extractor: str


class Extractor(Protocol):
    name: str

    def extract(self, text: str, task_id: str) -> list[Fact]: ...


def normalize(name: str) -> str:
    """Lowercase, strip accents, punctuation at the ends and leading articles."""
    decomposed = unicodedata.normalize("NFKD", name)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    plain = re.sub(r"[\"'`“”‘’()\[\]]", "", plain)
    words = plain.strip(" .,;:!?-").split()
    while len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return canonical(" ".join(words))


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [part.strip() for part in parts if part.strip()][:MAX_SENTENCES]


def _number(text: str) -> str | None:
    text = normalize(text)
    if re.fullmatch(r"-?\d+(?:[.,]\d+)?", text):
        return text.replace(",", ".")
    if text in NUMBER_WORDS:
        return str(NUMBER_WORDS[text])
    return None


Builder = Callable[[re.Match[str], str], tuple[str, str, str] | None]


def _swap(relation: str) -> Builder:
    """Triple (object group, relation, subject group): 'X is the capital of Y' is Y's capital."""
    return lambda m, task: (m["o"], relation, m["s"])


def _keep(relation: str) -> Builder:
    return lambda m, task: (m["s"], relation, m["o"])


def _temperature(relation: str) -> Builder:
    """Temperatures in degrees Celsius, so that 100 C and 212 F are one value."""

    def build(m: re.Match[str], task: str) -> tuple[str, str, str] | None:
        number = _number(m["o"])
        if number is None:
            return None
        degrees = float(number)
        if (m["u"] or "c")[0].lower() == "f":
            degrees = (degrees - 32.0) * 5.0 / 9.0
        return m["s"], relation, f"{degrees:g} c"

    return build


def _superlative(table: dict[str, str]) -> Builder:
    def build(m: re.Match[str], task: str) -> tuple[str, str, str] | None:
        relation = table.get(normalize(m["adj"]))
        if relation is None:
            return None
        # "the largest planet in the solar system" and "the largest planet" name one category.
        category = re.sub(r"\s+(?:in|on|of|do|da|dos|das|no|na|em)\s.*$", "", m["cat"])
        return (category, relation, m["x"])

    return build


def _answer(m: re.Match[str], task: str) -> tuple[str, str, str] | None:
    number = _number(m["o"])
    return (f"task {task}", "answer", number) if number is not None else None


def _legs(m: re.Match[str], task: str) -> tuple[str, str, str] | None:
    number = _number(m["n"])
    return (m["s"], "leg_count", number) if number is not None else None


_NOT_EN = r"(?P<neg>not |n't )?"
_NOT_PT = r"(?P<neg>não |nao )?"
_SUP_EN = "|".join(SUPERLATIVES_EN)
_SUP_PT = "|".join(SUPERLATIVES_PT) + "|mais próximo|mais rápido"

# Order matters: specific forms come before "X is a Y" and "X is in Y".
PATTERNS: list[tuple[re.Pattern[str], Builder]] = [
    (re.compile(rf"^the answer is {_NOT_EN}(?P<o>-?[\w.,]+)", re.I), _answer),
    (re.compile(rf"^a resposta {_NOT_PT}é (?P<o>-?[\w.,]+)", re.I), _answer),
    (
        re.compile(rf"^(?P<s>.+?) is {_NOT_EN}the capital (?:city )?of (?P<o>.+)$", re.I),
        _swap("capital"),
    ),
    (
        re.compile(rf"^the capital (?:city )?of (?P<s>.+?) is {_NOT_EN}(?P<o>.+)$", re.I),
        _keep("capital"),
    ),
    (
        re.compile(rf"^(?P<s>.+?) {_NOT_PT}é (?:a )?capital d[aoe]s? (?P<o>.+)$", re.I),
        _swap("capital"),
    ),
    (re.compile(rf"^a capital d[aoe]s? (?P<s>.+?) {_NOT_PT}é (?P<o>.+)$", re.I), _keep("capital")),
    (
        re.compile(
            r"^(?P<s>.+?) (?P<neg>does not |doesn't )?(?:flows?|empties|drains|runs) "
            r"into (?P<o>.+)$",
            re.I,
        ),
        _keep("flows_into"),
    ),
    (
        re.compile(
            rf"^(?P<s>.+?) {_NOT_PT}(?:deságua|desagua|deságuam|desaguam|corre|flui)"
            r" (?:para |em |n[oa]s? |para [oa] )(?P<o>.+)$",
            re.I,
        ),
        _keep("flows_into"),
    ),
    (
        re.compile(
            r"^(?P<s>.+?) (?P<neg>does not |doesn't )?(?:boils?) at (?P<o>-?\d+(?:\.\d+)?|\w+)"
            r"\s*(?:degrees?|°)?\s*(?P<u>celsius|fahrenheit|c\b|f\b)?",
            re.I,
        ),
        _temperature("boils_at"),
    ),
    (
        re.compile(
            r"^(?P<s>.+?) (?P<neg>does not |doesn't )?(?:freezes?) at (?P<o>-?\d+(?:\.\d+)?|\w+)"
            r"\s*(?:degrees?|°)?\s*(?P<u>celsius|fahrenheit|c\b|f\b)?",
            re.I,
        ),
        _temperature("freezes_at"),
    ),
    (
        re.compile(
            rf"^(?P<s>.+?) {_NOT_PT}(?:ferve) a (?P<o>-?\d+(?:[.,]\d+)?|\w+)\s*(?:graus|grau|°)?"
            r"\s*(?P<u>celsius|fahrenheit|c\b|f\b)?",
            re.I,
        ),
        _temperature("boils_at"),
    ),
    (
        re.compile(
            rf"^(?P<s>.+?) {_NOT_PT}(?:congela) a (?P<o>-?\d+(?:[.,]\d+)?|\w+)\s*(?:graus|grau|°)?"
            r"\s*(?P<u>celsius|fahrenheit|c\b|f\b)?",
            re.I,
        ),
        _temperature("freezes_at"),
    ),
    (
        re.compile(rf"^(?P<x>.+?) (?:is|are) {_NOT_EN}the (?P<adj>{_SUP_EN}) (?P<cat>.+)$", re.I),
        _superlative(SUPERLATIVES_EN),
    ),
    (
        re.compile(rf"^the (?P<adj>{_SUP_EN}) (?P<cat>.+?) (?:is|are) {_NOT_EN}(?P<x>.+)$", re.I),
        _superlative(SUPERLATIVES_EN),
    ),
    (
        re.compile(rf"^(?P<x>.+?) {_NOT_PT}é [oa] (?P<adj>{_SUP_PT}) (?P<cat>.+)$", re.I),
        _superlative(SUPERLATIVES_PT),
    ),
    (
        re.compile(rf"^[oa] (?P<adj>{_SUP_PT}) (?P<cat>.+?) {_NOT_PT}é (?P<x>.+)$", re.I),
        _superlative(SUPERLATIVES_PT),
    ),
    (
        re.compile(r"^(?P<s>.+?) (?P<neg>does not |doesn't )?ha(?:s|ve) (?P<n>\w+) legs\b", re.I),
        _legs,
    ),
    (re.compile(rf"^(?P<s>.+?) {_NOT_PT}tem (?P<n>\w+) (?:pernas|patas)\b", re.I), _legs),
    (
        re.compile(rf"^(?P<s>.+?) (?:is|lies) {_NOT_EN}(?:located |situated )?in (?P<o>.+)$", re.I),
        _keep("located_in"),
    ),
    (
        re.compile(
            rf"^(?P<s>.+?) {_NOT_PT}(?:fica|está|esta|está localizad[oa]|se localiza) "
            r"(?:em|n[oa]s?) (?P<o>.+)$",
            re.I,
        ),
        _keep("located_in"),
    ),
    (re.compile(rf"^(?P<s>.+?) (?:is|are) {_NOT_EN}(?:a|an) (?P<o>[\w\s-]+)$", re.I), _keep(IS_A)),
    (re.compile(rf"^(?P<s>.+?) {_NOT_PT}é (?:um|uma) (?P<o>[\w\s-]+)$", re.I), _keep(IS_A)),
]
MAX_NAME_WORDS = 8  # longer "names" are clauses the patterns should not have matched


class PatternExtractor:
    name = "pattern"

    def extract(self, text: str, task_id: str) -> list[Fact]:
        facts = []
        for sentence in split_sentences(text):
            fact = self._match(sentence, task_id)
            if fact is not None:
                facts.append(fact)
        return facts

    def _match(self, sentence: str, task_id: str) -> Fact | None:
        for pattern, build in PATTERNS:
            match = pattern.search(sentence.rstrip(" .!?;"))
            if match is None:
                continue
            triple = build(match, task_id)
            if triple is None:
                return None
            subject, relation, obj = (normalize(part) for part in triple)
            relation = triple[1]
            if not _plausible(subject) or not _plausible(obj):
                return None
            negated = bool(match.groupdict().get("neg"))
            confidence = IS_A_CONFIDENCE if relation == IS_A else PATTERN_CONFIDENCE
            return Fact(subject, relation, obj, negated, confidence, sentence, self.name)
        return None


def _plausible(name: str) -> bool:
    return bool(name) and len(name.split()) <= MAX_NAME_WORDS


MODEL_PROMPT = """Turn each sentence into one fact: subject | relation | object.
Relations: capital, flows_into, located_in, boils_at, largest, is_a.
Write NOT before a negated fact.
Sentence: Rome is the capital of Italy.
Fact: Italy | capital | Rome
Sentence: The Nile does not flow into the Red Sea.
Fact: NOT Nile | flows_into | Red Sea
Sentence: A whale is a mammal.
Fact: whale | is_a | mammal
Sentence: {sentence}
Fact:"""


class ModelExtractor:
    """Ask the model for a triple per sentence; sentences it cannot turn into a known
    relation yield nothing. Small base models get many wrong, so confidence is low."""

    name = "model"

    def __init__(self, backend: Backend, max_sentences: int = 4):
        self.backend = backend
        self.max_sentences = max_sentences

    def extract(self, text: str, task_id: str) -> list[Fact]:
        from runtime.backend import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=24, stop=("\n",), seed=0)
        facts = []
        for sentence in split_sentences(text)[: self.max_sentences]:
            output = self.backend.generate(MODEL_PROMPT.format(sentence=sentence), params).text
            fact = parse_model_fact(output, sentence)
            if fact is not None:
                facts.append(fact)
        return facts


def parse_model_fact(output: str, sentence: str) -> Fact | None:
    text = output.strip()
    negated = text.upper().startswith("NOT ")
    if negated:
        text = text[4:]
    parts = [part.strip() for part in text.split("|")]
    if len(parts) != 3 or parts[1] not in KNOWN_RELATIONS:
        return None
    subject, obj = normalize(parts[0]), normalize(parts[2])
    if not _plausible(subject) or not _plausible(obj):
        return None
    return Fact(subject, parts[1], obj, negated, MODEL_CONFIDENCE, sentence, "model")


def extract_all(extractors: Iterable[Extractor], text: str, task_id: str) -> list[Fact]:
    """Run every extractor; a triple found by several is kept once, at its highest confidence."""
    best: dict[tuple[str, str, str, bool], Fact] = {}
    for extractor in extractors:
        for fact in extractor.extract(text, task_id):
            key = (fact.subject, fact.relation, fact.object, fact.negated)
            if key not in best or fact.confidence > best[key].confidence:
                best[key] = fact
    return list(best.values())
