"""Phase 1 records: one tour-stop prompt (and later its response) per place, style and language.

A record carries the exact system and user text sent to the model, so a JSONL file of records is
a complete, replayable description of a Phase 1 run. Records are built from the shipped
`data/places.json`, whose Plus Codes are computed here from lat/lng rather than stored by hand.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from actclient import pluscode
from actclient.phase1.prompts import STYLES, build_prompt, check_style, language_name

PLACE_FIELDS = ("id", "name_local", "name_en", "city", "country", "language", "lat", "lng")
LANGUAGE_MODES = ("local", "English")


def default_places_path() -> Path:
    """Path of the places shipped with the package (`actclient/data/places.json`)."""
    return Path(__file__).resolve().parent.parent / "data" / "places.json"


@dataclass
class Phase1Record:
    """One Phase 1 request and, once generated, its response."""

    id: str
    plus_code: str
    interests: list[str]
    style: str
    country: str
    language: str
    prompt: str
    system: str
    max_tokens: int
    response: str | None = None
    place: dict[str, str] | None = field(default=None)

    def messages(self) -> list[dict[str, str]]:
        """The request as OpenAI chat messages."""
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.prompt},
        ]

    def to_json(self) -> str:
        """One JSON line (no trailing newline), UTF-8 text kept readable."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> Phase1Record:
        """Parse a record from a JSON line or a dict; raise ValueError naming the bad field.

        Only `id` and `plus_code` are required: when `prompt` is missing, the prompt, system
        text and max_tokens are rebuilt from plus_code, interests, style, country and language.
        """
        obj = json.loads(data) if isinstance(data, str) else data
        if not isinstance(obj, Mapping):
            raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")

        def text(name: str, default: str | None = None) -> str:
            value = obj.get(name, default)
            if not isinstance(value, str) or (default is None and not value):
                raise ValueError(f"field '{name}' must be a non-empty string, got {value!r}")
            return value

        record_id = text("id")
        code = text("plus_code")
        pluscode.validate(code)
        interests = obj.get("interests", [])
        if not isinstance(interests, list) or not all(isinstance(i, str) for i in interests):
            raise ValueError(f"field 'interests' must be a list of strings, got {interests!r}")
        style = text("style", "stimulate")
        if style not in STYLES:
            raise ValueError(f"field 'style' must be one of {', '.join(STYLES)}, got {style!r}")
        country = text("country", "Australia")
        language = text("language", "English")
        response = obj.get("response")
        if response is not None and not isinstance(response, str):
            raise ValueError(f"field 'response' must be a string or null, got {response!r}")
        place = obj.get("place")
        if place is not None and not (
            isinstance(place, Mapping) and all(isinstance(v, str) for v in place.values())
        ):
            raise ValueError(f"field 'place' must be an object of strings or null, got {place!r}")
        if "prompt" in obj:
            prompt, system = text("prompt"), text("system")
            max_tokens = obj.get("max_tokens")
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(
                    f"field 'max_tokens' must be a positive integer, got {max_tokens!r}"
                )
        else:
            built = build_prompt(code, interests, style, country, language)
            prompt, system, max_tokens = built.user, built.system, built.max_tokens
        return cls(
            id=record_id,
            plus_code=code.upper(),
            interests=list(interests),
            style=style,
            country=country,
            language=language,
            prompt=prompt,
            system=system,
            max_tokens=max_tokens,
            response=response,
            place=dict(place) if place is not None else None,
        )


def load_places(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Read and check a places file (default: the shipped one); raise ValueError on a bad entry."""
    path = Path(path) if path is not None else default_places_path()
    try:
        places = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(places, list):
        raise ValueError(f"{path}: expected a JSON list of places")
    seen: set[str] = set()
    for i, place in enumerate(places):
        where = f"{path}: place {i}"
        if not isinstance(place, dict):
            raise ValueError(f"{where}: expected an object")
        missing = [f for f in PLACE_FIELDS if f not in place]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if place["id"] in seen:
            raise ValueError(f"{where}: duplicate id {place['id']!r}")
        seen.add(place["id"])
        lat, lng = place["lat"], place["lng"]
        if not (isinstance(lat, int | float) and -90 <= lat <= 90):
            raise ValueError(f"{where}: field 'lat' must be a number in [-90, 90], got {lat!r}")
        if not (isinstance(lng, int | float) and -180 <= lng <= 180):
            raise ValueError(f"{where}: field 'lng' must be a number in [-180, 180], got {lng!r}")
        language_name(place["language"])
    return places


def build_dataset(
    places_path: str | os.PathLike[str] | None = None,
    styles: Sequence[str] = ("stimulate",),
    languages: str = "local",
) -> list[Phase1Record]:
    """One record per place and style, in the place's local language or in English.

    `languages` is "local" (each place's own tour language) or "English". Record ids are
    `<place id>.<style>.<language code>`.
    """
    if languages not in LANGUAGE_MODES:
        raise ValueError(f"languages must be one of {', '.join(LANGUAGE_MODES)}; got {languages!r}")
    if not styles:
        raise ValueError(f"styles must name at least one of {', '.join(STYLES)}")
    for style in styles:
        check_style(style)
    records = []
    for place in load_places(places_path):
        code = pluscode.encode(place["lat"], place["lng"])
        lang = place["language"] if languages == "local" else "en"
        for style in styles:
            built = build_prompt(
                code,
                place.get("interests", []),
                style=style,
                country=place["country"],
                language=language_name(lang),
            )
            records.append(
                Phase1Record(
                    id=f"{place['id']}.{style}.{lang}",
                    plus_code=code,
                    interests=list(place.get("interests", [])),
                    style=style,
                    country=place["country"],
                    language=language_name(lang),
                    prompt=built.user,
                    system=built.system,
                    max_tokens=built.max_tokens,
                    place={k: place[k] for k in ("name_local", "name_en", "city")},
                )
            )
    return records


def write_jsonl(records: Iterable[Phase1Record], path: str | os.PathLike[str]) -> None:
    """Write records as JSONL atomically: to a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
