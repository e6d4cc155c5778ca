"""Load Phase 1 records from JSONL files and from folders of `<plus code>_<lang>.txt` samples.

Every problem becomes an error string `file:line: what is wrong` and loading goes on, so one
bad line or file never hides the good records, and the user can fix all problems in one pass.
A `.txt` sample's text is the response; its prompt is rebuilt with `build_prompt` from the
code and language in the file name (the style is "stimulate", interests are unknown, and the
country comes from the nearest shipped place within 50 km, if any).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from actclient import pluscode
from actclient.phase1.dataset import Phase1Record, load_places
from actclient.phase1.prompts import build_prompt, language_name

SAMPLE_STYLE = "stimulate"
_COUNTRY_RADIUS_KM = 50.0


@dataclass
class IngestResult:
    """The records that loaded and one `file:line: message` string per problem."""

    records: list[Phase1Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _distance_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle (haversine) distance."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))


class _CountryLookup:
    """Country of the nearest shipped place, loaded once per ingest."""

    def __init__(self) -> None:
        self._places: list[dict] | None = None

    def __call__(self, lat: float, lng: float) -> str:
        if self._places is None:
            self._places = load_places()
        best = min(self._places, key=lambda p: _distance_km(lat, lng, p["lat"], p["lng"]))
        if _distance_km(lat, lng, best["lat"], best["lng"]) <= _COUNTRY_RADIUS_KM:
            return best["country"]
        return ""


def _read_sample(path: Path, country_of: _CountryLookup) -> Phase1Record:
    """One `<plus code>_<lang>.txt` sample as a record; raise ValueError saying what is wrong."""
    stem = path.name[: -len(".txt")]
    code, sep, lang = stem.rpartition("_")
    if not sep or not code:
        raise ValueError(
            f"file name must be '<plus code>_<language code>.txt' (e.g. '8FW4V75V+8Q_fr.txt'), "
            f"got {path.name!r}"
        )
    language = language_name(lang)
    pluscode.validate(code)
    response = path.read_text(encoding="utf-8")
    if not response.strip():
        raise ValueError("empty response text")
    area = pluscode.decode(code)
    country = country_of(area.center_lat, area.center_lng)
    prompt = build_prompt(code, [], style=SAMPLE_STYLE, country=country, language=language)
    return Phase1Record(
        id=stem,
        plus_code=prompt.plus_code,
        interests=[],
        style=SAMPLE_STYLE,
        country=country,
        language=language,
        prompt=prompt.user,
        system=prompt.system,
        max_tokens=prompt.max_tokens,
        response=response,
    )


def _expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files to read: each path itself, or a folder's `*.jsonl` and `*.txt` files, sorted."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".txt")))
        else:
            files.append(p)
    return files


def load_records(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> IngestResult:
    """Load records from JSONL files, `.txt` samples, and folders holding either.

    Errors read `file:line: message` (line 1 for a `.txt` file or a file that cannot be read).
    A record id seen twice is an error at the second occurrence; the first one is kept.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    result = IngestResult()
    first_seen: dict[str, str] = {}
    country_of = _CountryLookup()

    def add(record: Phase1Record, where: str) -> None:
        if record.id in first_seen:
            result.errors.append(
                f"{where}: duplicate id {record.id!r} (first at {first_seen[record.id]})"
            )
            return
        first_seen[record.id] = where
        result.records.append(record)

    for path in _expand(paths):
        if path.suffix == ".txt":
            try:
                add(_read_sample(path, country_of), f"{path}:1")
            except (OSError, UnicodeDecodeError, ValueError) as e:
                result.errors.append(f"{path}:1: {e}")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            result.errors.append(f"{path}:1: cannot read: {e}")
            continue
        # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                result.errors.append(f"{path}:{n}: bad JSON: {e.msg} (column {e.colno})")
                continue
            try:
                add(Phase1Record.from_json(obj), f"{path}:{n}")
            except ValueError as e:
                result.errors.append(f"{path}:{n}: {e}")
    return result
