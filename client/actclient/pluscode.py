"""Plus Codes (Open Location Code): the reference implementation, with messages that say why.

Phase 1 prompts name a tour stop by its Plus Code, so the client must check codes and turn them
into coordinates without network access. Encoding, decoding and recovering short codes are the
Open Location Code project's own Python implementation (`openlocationcode` on PyPI); this module
adds what it lacks: `validate` names the exact rule a code breaks (the library only says "not
valid"), errors are one exception type, and a decoded cell is a small dataclass.

Spec: https://github.com/google/open-location-code/blob/main/Documentation/Specification/specification.md
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from openlocationcode import openlocationcode as olc

ALPHABET = olc.CODE_ALPHABET_
SEPARATOR = olc.SEPARATOR_
SEPARATOR_POSITION = olc.SEPARATOR_POSITION_
PADDING = olc.PADDING_CHARACTER_
PAIR_CODE_LENGTH = olc.PAIR_CODE_LENGTH_
MAX_DIGIT_COUNT = olc.MAX_DIGIT_COUNT_
MIN_CODE_LENGTH = 2
LATITUDE_MAX = olc.LATITUDE_MAX_
LONGITUDE_MAX = olc.LONGITUDE_MAX_

_BASE = len(ALPHABET)
_VALUES = {c: i for i, c in enumerate(ALPHABET)}
_VALID_CHARS = set(ALPHABET) | {SEPARATOR, PADDING}
_PADDING_RUN = re.compile(PADDING + "+")


class PlusCodeError(ValueError):
    """A Plus Code that is malformed, not full, or short without a reference location."""


@dataclass(frozen=True)
class CodeArea:
    """The cell a Plus Code names: its bounds in degrees and the number of digits in the code."""

    south: float
    west: float
    north: float
    east: float
    code_length: int

    @property
    def center_lat(self) -> float:
        """Latitude of the cell centre (capped at 90, as the spec requires)."""
        return min(self.south + (self.north - self.south) / 2, LATITUDE_MAX)

    @property
    def center_lng(self) -> float:
        """Longitude of the cell centre (capped at 180, as the spec requires)."""
        return min(self.west + (self.east - self.west) / 2, LONGITUDE_MAX)

    def contains(self, lat: float, lng: float) -> bool:
        """True when (lat, lng) lies in the cell (south/west edges inclusive)."""
        return self.south <= lat < self.north and self.west <= lng < self.east


def _problem(code: str) -> str | None:
    """Return the first spec rule `code` breaks as a phrase, or None when it is a valid code."""
    if not code:
        return "code is empty"
    if any(c.isspace() for c in code):
        return (
            "whitespace is not allowed (locality suffixes such as '9G8F+6X Zurich' are not "
            "supported; give a full code)"
        )
    for i, c in enumerate(code):
        if c.upper() not in _VALID_CHARS:
            return (
                f"invalid character {c!r} at position {i} "
                f"(allowed: {ALPHABET}, separator '+', padding '0')"
            )
    count = code.count(SEPARATOR)
    if count == 0:
        return "separator '+' is missing"
    if count > 1:
        return f"separator '+' must appear exactly once, found {count}"
    if len(code) == 1:
        return "code has no digits"
    sep = code.index(SEPARATOR)
    if sep > SEPARATOR_POSITION or sep % 2 == 1:
        return (
            f"separator '+' must be at position {SEPARATOR_POSITION} "
            f"(or at position 0, 2, 4 or 6 in a short code), found at position {sep}"
        )
    if PADDING in code:
        pad = code.index(PADDING)
        if sep < SEPARATOR_POSITION:
            return "padding '0' is not allowed in a short code"
        if pad == 0:
            return "padding '0' cannot start a code"
        runs = _PADDING_RUN.findall(code)
        if len(runs) > 1:
            return "padding '0' must be a single run of characters"
        if len(runs[0]) % 2 == 1:
            return f"padding '0' must come in pairs, found a run of {len(runs[0])}"
        if not code.endswith(SEPARATOR):
            return "a padded code must end with the separator '+' (no digits after padding)"
    if len(code) - sep - 1 == 1:
        return "a single character after '+' is not allowed (use none, or two or more)"
    return None


def _range_problem(code: str) -> str | None:
    """For a valid code with '+' at position 8, say which leading digit is out of range."""
    first = code[0].upper()
    if _VALUES[first] * _BASE >= 2 * LATITUDE_MAX:
        return (
            f"first character {first!r} puts latitude out of range (must be one of "
            f"{ALPHABET[: 2 * LATITUDE_MAX // _BASE]})"
        )
    second = code[1].upper()
    if _VALUES[second] * _BASE >= 2 * LONGITUDE_MAX:
        return (
            f"second character {second!r} puts longitude out of range (must be one of "
            f"{ALPHABET[: 2 * LONGITUDE_MAX // _BASE]})"
        )
    return None


def is_valid(code: str) -> bool:
    """True when `code` is a syntactically valid full or short Plus Code (case-insensitive);
    the reference implementation's answer (`_problem` only explains a refusal)."""
    return bool(olc.isValid(code))


def is_short(code: str) -> bool:
    """True when `code` is valid and short (its '+' comes before position 8, e.g. '9G8F+6X')."""
    return bool(olc.isShort(code))


def is_full(code: str) -> bool:
    """True when `code` is valid, not short, and its first two digits are within lat/lng range."""
    return bool(olc.isFull(code))


def validate(code: str, reference: tuple[float, float] | None = None) -> None:
    """Raise PlusCodeError naming `code` and the rule it breaks; return None when usable.

    A short code is usable only with a `reference` (lat, lng) to recover the full code from.
    """
    problem = None
    if not is_valid(code):
        problem = _problem(code) or "not valid"
    elif not is_short(code) and not is_full(code):
        problem = _range_problem(code) or "not a full code"
    if problem is None and is_short(code) and reference is None:
        problem = "short code needs a reference location (lat, lng) to recover the full code"
    if problem is not None:
        raise PlusCodeError(f"{code!r} is not a valid Plus Code: {problem}")


def parse(code: str, reference: tuple[float, float] | None = None) -> str:
    """Return the full, upper-case form of `code` (trimmed), recovering a short code near
    `reference`; raise PlusCodeError otherwise."""
    code = code.strip()
    validate(code, reference)
    if is_short(code):
        assert reference is not None  # validate() guarantees it
        return recover_nearest(code, *reference)
    return code.upper()


def _check_coordinates(lat: float, lng: float) -> None:
    if not (math.isfinite(lat) and math.isfinite(lng)):
        raise PlusCodeError(f"lat/lng must be finite numbers, got ({lat!r}, {lng!r})")


def encode(lat: float, lng: float, code_length: int = PAIR_CODE_LENGTH) -> str:
    """Encode a location as a full Plus Code of `code_length` digits (2-8 even, or 10-15).

    Latitude is clipped to [-90, 90] and longitude wrapped into [-180, 180), as the spec says.
    """
    _check_coordinates(lat, lng)
    if code_length < MIN_CODE_LENGTH or (code_length < PAIR_CODE_LENGTH and code_length % 2):
        raise PlusCodeError(f"code_length must be 2, 4, 6, 8 or 10-15, got {code_length}")
    # The library wraps longitude by adding 360 in a loop: wrap first, in one step.
    lng = (lng + LONGITUDE_MAX) % (2 * LONGITUDE_MAX) - LONGITUDE_MAX
    return olc.encode(lat, lng, min(code_length, MAX_DIGIT_COUNT))


def decode(code: str) -> CodeArea:
    """Decode a full Plus Code into the cell it names; raise PlusCodeError for anything else."""
    validate(code)
    if is_short(code):
        raise PlusCodeError(
            f"{code!r} is not a valid Plus Code: short code needs a reference location "
            "(lat, lng) to recover the full code; use recover_nearest()"
        )
    area = olc.decode(code)
    return CodeArea(
        south=area.latitudeLo,
        west=area.longitudeLo,
        north=area.latitudeHi,
        east=area.longitudeHi,
        code_length=area.codeLength,
    )


def recover_nearest(short_code: str, ref_lat: float, ref_lng: float) -> str:
    """Return the full code nearest (ref_lat, ref_lng) whose suffix is `short_code`.

    A full code comes back upper-cased and unchanged; an invalid code raises PlusCodeError.
    """
    _check_coordinates(ref_lat, ref_lng)
    if is_full(short_code):
        return short_code.upper()
    if not is_short(short_code):
        validate(short_code)  # raises with the precise rule
        raise PlusCodeError(f"{short_code!r} is not a valid Plus Code: not a short code")
    ref_lng = (ref_lng + LONGITUDE_MAX) % (2 * LONGITUDE_MAX) - LONGITUDE_MAX  # as in encode
    return olc.recoverNearest(short_code, ref_lat, ref_lng).upper()
