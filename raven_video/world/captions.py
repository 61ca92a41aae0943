"""Caption grammar of the video world: :func:`caption` writes a scene as text, :func:`parse_caption` reads it back.

Grammar (lowercase words, the comma is its own token; ``|`` separates alternatives, ``[...]`` is optional)::

    caption   := objects "," "on" "a" BACKGROUND "background"
    objects   := object | object "while" object | object "," object "," "and" object
    object    := article COLOUR SHAPE action        (article: "an" before "orange", else "a"; both parse)
    action    := "stays" "still"
               | "grows" SPEED
               | "circles" "around" "the" "center" SPEED
               | "moves" direction SPEED [ "and" "bounces" "off" "the" ( "wall" | "walls" ) ]
    direction := "left" | "right" | "up" | "down" | ( "up" | "down" ) "and" "to" "the" ( "left" | "right" )

Example: ``"a red circle moves right quickly and bounces off the wall while a blue square stays still, on a gray
background"``. The bounce clause states how many wall bounces the object makes in the captioned frames (81 by
default): ``"wall"`` for one, ``"walls"`` for two or more. ``parse_caption(caption(scene, bounces))`` returns
``ParsedCaption(scene, bounces)`` with bounce counts capped at 2; initial positions are not in the caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .scene import BACKGROUNDS, COLOURS, LINEAR_MOTIONS, SHAPES, SPEEDS, ObjectSpec, SceneSpec

__all__ = ["VOCABULARY", "DIRECTION_PHRASES", "ParsedCaption", "caption", "parse_caption", "tokenize"]

#: How each linear motion is written after "moves".
DIRECTION_PHRASES: dict[str, str] = {
    "left": "left",
    "right": "right",
    "up": "up",
    "down": "down",
    "up_left": "up and to the left",
    "up_right": "up and to the right",
    "down_left": "down and to the left",
    "down_right": "down and to the right",
}

_BOUNCE_PHRASES = {1: "and bounces off the wall", 2: "and bounces off the walls"}
_ACTION_WORDS = ["stays", "still", "grows", "circles", "around", "the", "center", "moves"]
_JOIN_WORDS = ["a", "an", "while", ",", "and", "on", "background"]

#: Every token the grammar can emit (words and ","), sorted: the vocabulary of a word-level tokenizer.
VOCABULARY: list[str] = sorted(
    set(_JOIN_WORDS + _ACTION_WORDS)
    | set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | set(SPEEDS)
    | {word for phrase in DIRECTION_PHRASES.values() for word in phrase.split()}
    | {word for phrase in _BOUNCE_PHRASES.values() for word in phrase.split()}
)
_KNOWN = frozenset(VOCABULARY)


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption states: the scene and, per object, its wall bounces (0, 1, or 2 meaning two or more)."""

    scene: SceneSpec
    bounces: tuple[int, ...]


def tokenize(text: str) -> list[str]:
    """Split a caption into tokens: lowercase words and ``","``."""
    return text.lower().replace(",", " , ").split()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _action(obj: ObjectSpec, bounces: int) -> str:
    if obj.motion == "still":
        return "stays still"
    if obj.motion == "grows":
        return f"grows {obj.speed}"
    if obj.motion == "orbits":
        return f"circles around the center {obj.speed}"
    phrase = f"moves {DIRECTION_PHRASES[obj.motion]} {obj.speed}"
    return f"{phrase} {_BOUNCE_PHRASES[min(bounces, 2)]}" if bounces else phrase


def _check_bounces(scene: SceneSpec, bounces: Sequence[int] | None) -> tuple[int, ...]:
    if bounces is None:
        return (0,) * len(scene.objects)
    if len(bounces) != len(scene.objects):
        raise ValueError(f"bounces has {len(bounces)} entries for {len(scene.objects)} objects; pass one per object.")
    for obj, count in zip(scene.objects, bounces):
        if count < 0 or (count and obj.motion not in LINEAR_MOTIONS):
            raise ValueError(f"bounce count {count} is invalid for a {obj.motion!r} object; only straight-line "
                             f"motions bounce, with a count >= 0.")
    return tuple(min(int(count), 2) for count in bounces)


def caption(scene: SceneSpec, bounces: Sequence[int] | None = None) -> str:
    """Write ``scene`` as a caption.

    Args:
        scene: the scene.
        bounces: per object, the number of wall bounces within the captioned frames (``None``: no bounce
            clause); see :func:`raven_video.world.render.count_bounces`.
    """
    counts = _check_bounces(scene, bounces)
    phrases = [f"{_article(obj.colour)} {obj.colour} {obj.shape} {_action(obj, n)}"
               for obj, n in zip(scene.objects, counts)]
    if len(phrases) == 1:
        body = phrases[0]
    elif len(phrases) == 2:
        body = f"{phrases[0]} while {phrases[1]}"
    else:
        body = f"{phrases[0]}, {phrases[1]}, and {phrases[2]}"
    return f"{body}, on a {scene.background} background"


class _Reader:
    """A cursor over caption tokens whose errors name the caption, the position and what was expected."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self, ahead: int = 0) -> str | None:
        index = self.pos + ahead
        return self.tokens[index] if index < len(self.tokens) else None

    def take(self, *options: str) -> str:
        token = self.peek()
        if token not in options:
            found = "the end of the caption" if token is None else repr(token)
            raise ValueError(f"caption {self.text!r}: expected {' or '.join(map(repr, options))} at token "
                             f"{self.pos + 1}, found {found}; see raven_video.world.captions for the grammar.")
        self.pos += 1
        return token


def _parse_motion(reader: _Reader) -> tuple[str, str | None, int]:
    """``action`` -> (motion, speed, bounces)."""
    verb = reader.take("stays", "grows", "circles", "moves")
    if verb == "stays":
        reader.take("still")
        return "still", None, 0
    if verb == "grows":
        return "grows", reader.take(*SPEEDS), 0
    if verb == "circles":
        for word in ("around", "the", "center"):
            reader.take(word)
        return "orbits", reader.take(*SPEEDS), 0
    motion = reader.take("left", "right", "up", "down")
    if motion in ("up", "down") and reader.peek() == "and":
        for word in ("and", "to", "the"):
            reader.take(word)
        motion = f"{motion}_{reader.take('left', 'right')}"
    speed = reader.take(*SPEEDS)
    bounces = 0
    if reader.peek() == "and":
        for word in ("and", "bounces", "off", "the"):
            reader.take(word)
        bounces = 1 if reader.take("wall", "walls") == "wall" else 2
    return motion, speed, bounces


def _parse_object(reader: _Reader) -> tuple[ObjectSpec, int]:
    reader.take("a", "an")
    colour = reader.take(*COLOURS)
    shape = reader.take(*SHAPES)
    motion, speed, bounces = _parse_motion(reader)
    return ObjectSpec(shape=shape, colour=colour, motion=motion, speed=speed), bounces


def parse_caption(text: str) -> ParsedCaption:
    """Read a caption written by :func:`caption` (case and spacing are ignored).

    Raises:
        ValueError: naming the first unknown word, or the first token that breaks the grammar.
        TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption is a str, got {type(text).__name__}; pass the prompt text.")
    reader = _Reader(text)
    unknown = [token for token in reader.tokens if token not in _KNOWN]
    if unknown:
        raise ValueError(f"unknown word {unknown[0]!r} in caption {text!r}; use only words of "
                         f"raven_video.world.VOCABULARY.")
    parsed = [_parse_object(reader)]
    if reader.peek() == "while":
        reader.take("while")
        parsed.append(_parse_object(reader))
    elif reader.peek() == "," and reader.peek(1) in ("a", "an"):
        reader.take(",")
        parsed.append(_parse_object(reader))
        reader.take(",")
        reader.take("and")
        parsed.append(_parse_object(reader))
    for word in (",", "on", "a"):
        reader.take(word)
    background = reader.take(*BACKGROUNDS)
    reader.take("background")
    if reader.peek() is not None:
        raise ValueError(f"caption {text!r} continues after 'background' with {reader.peek()!r}; end it there.")
    objects = tuple(obj for obj, _ in parsed)
    colours = [obj.colour for obj in objects]
    if len(set(colours)) != len(colours):
        raise ValueError(f"caption {text!r} repeats a colour ({colours}); each object needs its own colour.")
    return ParsedCaption(SceneSpec(objects=objects, background=background), tuple(n for _, n in parsed))
