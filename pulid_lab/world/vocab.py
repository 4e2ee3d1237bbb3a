"""The one place that knows the ToyFaces vocabulary: attributes, their values, caption phrases, the parser.

A caption is ``"a portrait, <phrase>, <phrase>, ..."``; every phrase names one value of one attribute
(``"blue background"``, ``"sketch"``, ``"glasses"``, ``"no hat"``, ``"left light"``, ``"on the left"``).
Attributes a caption does not mention are left open (``None``): training captions are incomplete on
purpose (docs/world.md).
"""
from __future__ import annotations

import re
from typing import Mapping

# attribute -> values (index = class label). ``age`` is the ID-attribute edit ("old" = grey hair).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink"),
    "style": ("photo", "sketch", "pixel", "comic", "painting"),
    "lighting": ("front", "left", "right", "top"),
    "glasses": ("no", "yes"),
    "hat": ("no", "yes"),
    "expression": ("neutral", "smiling", "surprised"),
    "position": ("left", "center", "right"),
    "scale": ("distant", "close-up"),
    "age": ("young", "old"),
}
NON_ID_ATTRIBUTES = tuple(a for a in ATTRIBUTES if a != "age")
ID_EDIT_ATTRIBUTES = ("age",)
SUBJECT = "a portrait"


def phrase(attribute: str, value: str) -> str:
    """The caption phrase for one attribute value."""
    if attribute == "background":
        return f"{value} background"
    if attribute == "style":
        return "pixel art" if value == "pixel" else value
    if attribute == "lighting":
        return f"{value} light"
    if attribute in ("glasses", "hat"):
        return attribute if value == "yes" else f"no {attribute}"
    if attribute == "position":
        return "in the center" if value == "center" else f"on the {value}"
    return value  # expression, scale, age


PHRASES: dict[str, tuple[str, str]] = {
    phrase(a, v): (a, v) for a, values in ATTRIBUTES.items() for v in values
}
WORDS: tuple[str, ...] = tuple(
    sorted({w for p in list(PHRASES) + [SUBJECT] for w in p.split()} | {","})
)


class VocabularyError(ValueError):
    """A caption uses a word or phrase outside the closed ToyFaces vocabulary."""


def caption(attributes: Mapping[str, str | None]) -> str:
    """Caption for attribute values; ``None`` or missing attributes are not mentioned."""
    parts = [SUBJECT]
    for name in ATTRIBUTES:
        value = attributes.get(name)
        if value is None:
            continue
        if value not in ATTRIBUTES[name]:
            raise VocabularyError(
                f"unknown value {value!r} for attribute {name!r}; choose one of {ATTRIBUTES[name]}"
            )
        parts.append(phrase(name, value))
    return ", ".join(parts)


def caption_from_labels(labels: Mapping, i: int, attributes=None) -> str:
    """Caption of item ``i`` of label arrays ``{attribute: value indices}`` (as renders and banks keep them),
    naming ``attributes`` (default: every attribute)."""
    names = ATTRIBUTES if attributes is None else attributes
    return caption({a: ATTRIBUTES[a][int(labels[a][i])] for a in names})


def tokenize_words(text: str) -> list[str]:
    """Lower-case words with commas as their own token, e.g. ``['a', 'portrait', ',', 'sketch']``."""
    return re.findall(r"[a-z\-]+|,", text.lower())


def check_words(text: str) -> None:
    for word in tokenize_words(text):
        if word not in WORDS:
            raise VocabularyError(
                f"unknown word {word!r} in caption {text!r}. The ToyFaces vocabulary is closed; "
                f"known words: {' '.join(WORDS)}"
            )
    leftovers = re.sub(r"[a-zA-Z\-]+|,|\s", "", text)
    if leftovers:
        raise VocabularyError(f"unexpected characters {leftovers!r} in caption {text!r}; use words and commas")


def parse(text: str) -> dict[str, str | None]:
    """Caption -> attribute values (``None`` where the caption is silent).

    >>> parse("a portrait, sketch, blue background, glasses")["style"]
    'sketch'
    """
    check_words(text)
    values: dict[str, str | None] = {a: None for a in ATTRIBUTES}
    for segment in text.lower().split(","):
        seg = " ".join(segment.split())
        if seg in ("", SUBJECT, "portrait"):
            continue
        if seg not in PHRASES:
            raise VocabularyError(
                f"phrase {seg!r} is not understood; known phrases: {', '.join(sorted(PHRASES))}"
            )
        attribute, value = PHRASES[seg]
        if values[attribute] not in (None, value):
            raise VocabularyError(
                f"caption {text!r} asks for two values of {attribute!r}: {values[attribute]!r} and {value!r}"
            )
        values[attribute] = value
    return values


def canonical(text: str) -> str:
    """The caption with its phrases in the vocabulary's order (what the text encoder was trained on);
    the empty caption stays empty. ``canonical("a portrait, sketch, blue background") ==
    "a portrait, blue background, sketch"``."""
    if not text.strip():
        return text
    return caption(parse(text))
