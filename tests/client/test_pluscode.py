"""Our use of the reference Plus Code implementation: known pairs from the spec's test data,
its rules with our messages, and wrapping it (huge longitudes) must not change the answers."""

from __future__ import annotations

import random

import pytest

from actclient import pluscode as pc
from actclient.pluscode import PlusCodeError

# (lat, lng, length, code): rows of the spec's test_data/encoding.csv, incl. float edge cases.
ENCODING = [
    (20.375, 2.775, 6, "7FG49Q00+"),
    (20.3700625, 2.7821875, 10, "7FG49QCJ+2V"),
    (20.3701135, 2.78223535156, 13, "7FG49QCJ+2VXGJ"),
    (47.0000625, 8.0000625, 10, "8FVC2222+22"),
    (-41.2730625, 174.7859375, 10, "4VCPPQGP+Q9"),
    (90, 1, 10, "CFX3X2X2+X2"),
    (92, 1, 4, "CFX30000+"),
    (1, 181, 4, "62H30000+"),
    (47.0000625, -711.9999375, 10, "8FVC2222+22"),
    (1.2, 3.4, 10, "6FH56C22+22"),
    (37.539669125, -122.375069724, 100, "849VGJQF+VX7QR3J"),
    (35.6, 3.033, 10, "8F75J22M+26"),
    (80.0100000001, 58.57, 15, "CHGW2H6C+2222222"),
    (80.0099999999, 58.57, 15, "CHGW2H5C+X2RRRRR"),
    (-80.0, -360000000170.0, 2, "22000000+"),
]

# (code, south, west, north, east, length): rows of test_data/decoding.csv.
DECODING = [
    ("7FG49Q00+", 20.35, 2.75, 20.4, 2.8, 6),
    ("7FG49QCJ+2VX", 20.3701, 2.78221875, 20.370125, 2.78225, 11),
    ("CFX3X2X2+X2", 89.999875, 1, 90, 1.000125, 10),
    ("84000000+", 30, -140, 50, -120, 2),
    ("849VGJQF+VX7QR3J7QR3J", 37.53966912, -122.3750698242, 37.53966916, -122.3750697021, 15),
]

# Real places (Phase 1 samples): code and the landmark's coordinates.
LANDMARKS = [
    ("8FW4V75V+8Q", 48.8583, 2.2945),  # Eiffel Tower
    ("4RRH46V8+74", -33.8568, 151.2153),  # Sydney Opera House
    ("589R2QXQ+6R", -22.9519, -43.2105),  # Christ the Redeemer
    ("8FHJVFRV+46", 41.8903, 12.4931),  # Colosseum (sample code, about 70 m east)
]

# (code, is_valid, is_short, is_full): test_data/validityTests.csv.
VALIDITY = [
    ("8FWC2345+G6", True, False, True),
    ("8fwc2345+", True, False, True),
    ("8FWCX400+", True, False, True),
    ("WC2345+G6g", True, True, False),
    ("+G6", True, True, False),
    ("G+", False, False, False),
    ("+", False, False, False),
    ("8FWC2345+G", False, False, False),
    ("8FWC2_45+G6", False, False, False),
    ("8FWC2η45+G6", False, False, False),
    ("8FWC2345+G6+", False, False, False),
    ("8FWC2345G6+", False, False, False),
    ("8FWC2300+G6", False, False, False),
    ("WC2300+G6g", False, False, False),
    ("WC2300+", False, False, False),
    ("849VGJQF+VX7QR3J", True, False, True),
    ("849VGJQF+VX7QR3U", False, False, False),
    ("FFFF0000+", True, False, False),
]


@pytest.mark.parametrize(("lat", "lng", "length", "code"), ENCODING)
def test_encode_known(lat: float, lng: float, length: int, code: str) -> None:
    assert pc.encode(lat, lng, length) == code


@pytest.mark.parametrize(("code", "south", "west", "north", "east", "length"), DECODING)
def test_decode_known(
    code: str, south: float, west: float, north: float, east: float, length: int
) -> None:
    area = pc.decode(code)
    assert (area.south, area.west, area.north, area.east) == pytest.approx(
        (south, west, north, east), abs=1e-9
    )
    assert area.code_length == length


@pytest.mark.parametrize(("code", "lat", "lng"), LANDMARKS)
def test_landmarks(code: str, lat: float, lng: float) -> None:
    area = pc.decode(code)
    assert abs(area.center_lat - lat) < 3e-4 and abs(area.center_lng - lng) < 3e-4
    assert pc.encode(area.center_lat, area.center_lng) == code


def test_eiffel_tower_encodes_to_its_code() -> None:
    assert pc.encode(48.85832, 2.29444) == "8FW4V75V+8Q"


@pytest.mark.parametrize("length", [2, 4, 6, 8, 10, 11, 12, 13, 14, 15])
def test_round_trip_contains_point(length: int) -> None:
    rng = random.Random(length)
    for _ in range(300):
        lat, lng = rng.uniform(-89.9, 89.9), rng.uniform(-180, 179.9)
        code = pc.encode(lat, lng, length)
        assert pc.is_full(code)
        area = pc.decode(code)
        assert area.code_length == length
        assert area.contains(lat, lng), (lat, lng, code, area)
        assert pc.encode(area.center_lat, area.center_lng, length) == code


@pytest.mark.parametrize(("code", "valid", "short", "full"), VALIDITY)
def test_validity(code: str, valid: bool, short: bool, full: bool) -> None:
    assert (pc.is_valid(code), pc.is_short(code), pc.is_full(code)) == (valid, short, full)


@pytest.mark.parametrize(
    ("code", "rule"),
    [
        ("", "code is empty"),
        ("8FW4V75V+8Q Paris", "whitespace is not allowed"),
        ("8FW4V75V+8QX1", "invalid character '1' at position 12"),
        ("8FW4V75V", "separator '+' is missing"),
        ("8FW4V75V++8Q", "separator '+' must appear exactly once, found 2"),
        ("8FW4V75V8+Q", "separator '+' must be at position 8"),
        ("8FW4V+75V8Q", "found at position 5"),
        ("+", "code has no digits"),
        ("8FW000+", "padding '0' is not allowed in a short code"),
        ("0F000000+", "padding '0' cannot start a code"),
        ("8F00GG00+", "padding '0' must be a single run"),
        ("8FW00000+", "padding '0' must come in pairs, found a run of 5"),
        ("8F000000+2Q", "a padded code must end with the separator '+'"),
        ("8FW4V75V+8", "a single character after '+' is not allowed"),
        ("XFW4V75V+8Q", "first character 'X' puts latitude out of range"),
        ("8XW4V75V+8Q", "second character 'X' puts longitude out of range"),
        ("V75V+8Q", "short code needs a reference location"),
    ],
)
def test_validate_names_code_and_rule(code: str, rule: str) -> None:
    with pytest.raises(PlusCodeError) as err:
        pc.validate(code)
    message = str(err.value)
    assert message.startswith(f"{code!r} is not a valid Plus Code: ")
    assert rule in message
    assert isinstance(err.value, ValueError)


def test_validate_accepts_full_and_short_with_reference() -> None:
    pc.validate("8FW4V75V+8Q")
    pc.validate("8fw4v75v+8q")
    pc.validate("V75V+8Q", reference=(48.86, 2.29))


def test_decode_rejects_short_and_invalid() -> None:
    with pytest.raises(PlusCodeError, match="short code needs a reference location"):
        pc.decode("V75V+8Q")
    with pytest.raises(PlusCodeError, match="latitude out of range"):
        pc.decode("XFW4V75V+8Q")


@pytest.mark.parametrize("length", [0, 1, 3, 9])
def test_encode_rejects_bad_length(length: int) -> None:
    with pytest.raises(PlusCodeError, match="code_length"):
        pc.encode(1.0, 1.0, length)


def test_encode_rejects_nan() -> None:
    with pytest.raises(PlusCodeError, match="finite"):
        pc.encode(float("nan"), 1.0)


@pytest.mark.parametrize(
    ("full", "lat", "lng", "short"),
    [  # rows of test_data/shortCodeTests.csv, and a Phase 1 sample near Sydney
        ("9C3W9QCJ+2VX", 51.3701125, -1.217765625, "+2VX"),
        ("9C3W9QCJ+2VX", 51.3708675, -1.217765625, "CJ+2VX"),
        ("9C3W9QCJ+2VX", 51.3852125, -1.217765625, "9QCJ+2VX"),
        ("8FJFW222+", 42.899, 9.012, "22+"),
        ("796RXG22+", 14.95125, -23.5001, "22+"),
        ("8FRCXGRF+PM", 47.00, 8.55, "XGRF+PM"),
        ("CFX22222+22", 89.6, 0.0, "2222+22"),
        ("2CXXXXXX+XX", -81.0, 0.0, "XXXXXX+XX"),
        ("4RRH46H4+8M", -33.87, 151.2, "46H4+8M"),
    ],
)
def test_recover_nearest(full: str, lat: float, lng: float, short: str) -> None:
    assert pc.recover_nearest(short, lat, lng) == full
    assert pc.parse(short.lower(), reference=(lat, lng)) == full


def test_recover_nearest_full_and_invalid() -> None:
    assert pc.recover_nearest("8fw4v75v+8q", 0, 0) == "8FW4V75V+8Q"
    with pytest.raises(PlusCodeError, match="invalid character"):
        pc.recover_nearest("V75V+8I", 48.8, 2.3)


def test_parse_trims_and_upper_cases() -> None:
    assert pc.parse("  8fw4v75v+8q\n") == "8FW4V75V+8Q"
    with pytest.raises(PlusCodeError, match="'V75V\\+8Q' .*short code needs a reference"):
        pc.parse("V75V+8Q")


def _mutations(rng: random.Random, code: str) -> str:
    """`code` with one to three random edits: a character replaced, inserted or removed."""
    chars = pc.ALPHABET + pc.ALPHABET.lower() + "+0 1_"
    out = list(code)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(out) + 1)
        edit = rng.choice(("replace", "insert", "delete"))
        if edit == "insert" or not out:
            out.insert(i, rng.choice(chars))
        elif edit == "replace":
            out[min(i, len(out) - 1)] = rng.choice(chars)
        else:
            del out[min(i, len(out) - 1)]
    return "".join(out)


def test_our_reasons_agree_with_the_reference_validity() -> None:
    """Validity is the library's; our messages must explain exactly its refusals: a code gets a
    reason iff the library calls it invalid (or valid but neither short nor full)."""
    from openlocationcode import openlocationcode as olc

    rng = random.Random(18)
    seeds = [code for code, *_ in VALIDITY] + [code for code, *_ in LANDMARKS]
    for length in (2, 4, 6, 8, 10, 11, 15):
        seeds.append(pc.encode(rng.uniform(-90, 90), rng.uniform(-180, 180), length))
    codes = seeds + [_mutations(rng, rng.choice(seeds)) for _ in range(20000)]
    for code in codes:
        usable = olc.isFull(code) or olc.isShort(code)
        try:
            pc.validate(code, reference=(0.0, 0.0))
        except PlusCodeError as exc:
            assert not usable, (code, str(exc))
            # A rule of ours, not the fallbacks for a refusal we could not explain.
            assert not str(exc).endswith((": not valid", ": not a full code")), (code, str(exc))
        else:
            assert usable, code
    assert sum(olc.isValid(c) for c in codes) > 2000  # the edits keep many codes valid
