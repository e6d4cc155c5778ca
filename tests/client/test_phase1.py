"""Phase 1 prompts, shipped dataset, record I/O, ingest errors, resume logic and CLI wiring."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from actclient import pluscode
from actclient.jsonl import JsonlAppender
from actclient.phase1 import cli
from actclient.phase1.dataset import (
    Phase1Record,
    build_dataset,
    default_places_path,
    load_places,
    write_jsonl,
)
from actclient.phase1.generate import finished_ids, generate
from actclient.phase1.ingest import load_records
from actclient.phase1.prompts import STYLES, build_prompt, language_name
from actclient.pluscode import PlusCodeError

OPERA_HOUSE = "4RRH46V8+74"


def test_styles_token_budgets() -> None:
    assert STYLES == {"brief": 200, "stimulate": 500, "detailed": 1500}
    for style, tokens in STYLES.items():
        prompt = build_prompt(OPERA_HOUSE, ["music"], style=style)
        assert prompt.max_tokens == tokens
        assert f"Style: {style}." in prompt.user
        assert f"about {tokens} tokens" in prompt.user


def test_prompt_defaults() -> None:
    prompt = build_prompt(OPERA_HOUSE, ["architecture", "music"])
    assert prompt.max_tokens == 500
    assert prompt.system.startswith("You are an engaging, extremely knowledgeable tour guide.")
    assert prompt.system.endswith("This particular tour will be given in English.")
    assert f"Plus Code {OPERA_HOUSE}" in prompt.user
    assert "latitude -33.85681, longitude 151.21531" in prompt.user
    assert "in Australia" in prompt.user
    assert "architecture, music" in prompt.user
    assert prompt.messages() == [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": prompt.user},
    ]


def test_prompt_language_country_and_no_interests() -> None:
    prompt = build_prompt("8fw4v75v+8q", [], country="France", language="French")
    assert prompt.plus_code == "8FW4V75V+8Q"
    assert "given in French." in prompt.system
    assert "in France" in prompt.user
    assert "general sightseeing" in prompt.user
    assert "in " not in build_prompt(OPERA_HOUSE, [], country="").user.split("\n")[0][-12:]


def test_prompt_unknown_style() -> None:
    with pytest.raises(ValueError, match=r"style must be one of brief, stimulate, detailed"):
        build_prompt(OPERA_HOUSE, [], style="chatty")


def test_prompt_short_code_needs_reference() -> None:
    with pytest.raises(PlusCodeError, match=r"'46V8\+74' .*short code needs a reference"):
        build_prompt("46V8+74", ["music"])
    prompt = build_prompt("46V8+74", ["music"], reference=(-33.86, 151.21))
    assert prompt.plus_code == OPERA_HOUSE


def test_prompt_invalid_code() -> None:
    with pytest.raises(PlusCodeError, match=r"'4RRH46V8\+7' is not a valid Plus Code"):
        build_prompt("4RRH46V8+7", [])


def test_language_names() -> None:
    assert language_name("fr") == "French"
    assert language_name("ZH") == "Chinese"
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        language_name("xx")


def test_shipped_places() -> None:
    places = load_places()
    assert len(places) >= 48
    assert len({p["city"] for p in places}) >= 10
    assert len({p["language"] for p in places}) >= 5
    assert len({p["id"] for p in places}) == len(places)
    for place in places:
        assert 1 <= len(place["interests"]) <= 3
        assert place["lat"] == round(place["lat"], 5) and place["lng"] == round(place["lng"], 5)
        code = pluscode.encode(place["lat"], place["lng"])
        assert pluscode.is_full(code)
        assert pluscode.decode(code).contains(place["lat"], place["lng"]), place["id"]
    assert (default_places_path().parent / "README.md").exists()


def test_build_dataset_local_and_english() -> None:
    records = build_dataset()
    assert len(records) == len(load_places())
    assert len({r.language for r in records}) >= 5
    eiffel = next(r for r in records if r.id == "tour-eiffel.stimulate.fr")
    assert eiffel.plus_code == pluscode.encode(48.85837, 2.29448)
    assert eiffel.language == "French" and eiffel.country == "France"
    assert eiffel.place == {"name_local": "Tour Eiffel", "name_en": "Eiffel Tower", "city": "Paris"}
    assert eiffel.max_tokens == 500 and eiffel.response is None

    english = build_dataset(styles=("brief", "detailed"), languages="English")
    assert len(english) == 2 * len(records)
    assert {r.language for r in english} == {"English"}
    assert {r.max_tokens for r in english} == {200, 1500}
    assert len({r.id for r in english}) == len(english)


def test_build_dataset_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="languages must be one of local, English"):
        build_dataset(languages="French")
    with pytest.raises(ValueError, match="style must be one of"):
        build_dataset(styles=("long",))


def test_record_json_round_trip_and_write_jsonl(tmp_path: Path) -> None:
    records = build_dataset(styles=("brief",))[:3]
    records[0].response = "G'day \u2028 everyone"
    path = tmp_path / "sub" / "records.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    write_jsonl(records, path)
    assert [p.name for p in path.parent.iterdir()] == ["records.jsonl"]  # no temp left
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 4
    assert [Phase1Record.from_json(line) for line in lines[:3]] == records
    assert load_records(path).records == records


def test_record_from_json_minimal_rebuilds_prompt() -> None:
    record = Phase1Record.from_json({"id": "x", "plus_code": "8fw4v75v+8q", "style": "brief"})
    assert record.plus_code == "8FW4V75V+8Q"
    assert record.max_tokens == 200
    assert record.prompt == build_prompt("8FW4V75V+8Q", [], style="brief").user


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_ingest_txt_samples(tmp_path: Path) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    _write(folder / "8FW4V75V+8Q_fr.txt", "Bonjour ! Voici la tour Eiffel.\n")
    _write(folder / "4RRH46V8+74_en.txt", "G'day!\n")
    _write(folder / "97MH+J9.txt", "no language")
    _write(folder / "58XC+PQ_pt.txt", "short code")
    _write(folder / "8FW4V75V+8Q_xx.txt", "unknown language")
    _write(folder / "8FW4V75V+8I_en.txt", "bad character")
    _write(folder / "8FW4V7JV+4X_fr.txt", "  \n")
    _write(folder / "notes.md", "ignored")

    result = load_records(folder)
    assert sorted(r.id for r in result.records) == ["4RRH46V8+74_en", "8FW4V75V+8Q_fr"]
    fr = next(r for r in result.records if r.id == "8FW4V75V+8Q_fr")
    assert fr.response == "Bonjour ! Voici la tour Eiffel.\n"
    assert fr.language == "French" and fr.country == "France"
    assert fr.style == "stimulate" and fr.max_tokens == 500
    assert fr.system.endswith("given in French.")
    assert fr.prompt == build_prompt("8FW4V75V+8Q", [], country="France", language="French").user

    errors = sorted(result.errors)
    assert len(errors) == 5
    assert errors[0].startswith(f"{folder / '58XC+PQ_pt.txt'}:1: '58XC+PQ' is not a valid ")
    assert "short code needs a reference location" in errors[0]
    assert errors[1].startswith(f"{folder / '8FW4V75V+8I_en.txt'}:1: ")
    assert "invalid character 'I' at position 10" in errors[1]
    assert errors[2] == f"{folder / '8FW4V75V+8Q_xx.txt'}:1: " + errors[2].split(":1: ", 1)[1]
    assert "unknown language code 'xx'" in errors[2]
    assert errors[3] == f"{folder / '8FW4V7JV+4X_fr.txt'}:1: empty response text"
    assert errors[4].startswith(f"{folder / '97MH+J9.txt'}:1: file name must be")


def test_ingest_jsonl_errors_keep_good_records(tmp_path: Path) -> None:
    good = build_dataset(styles=("brief",))[:2]
    lines = [
        good[0].to_json(),  # 1
        "",  # 2: blank, skipped
        "{not json",  # 3
        json.dumps({"plus_code": "8FW4V75V+8Q"}),  # 4: no id
        json.dumps({"id": "a", "plus_code": "8FW4V75V+8"}),  # 5: bad code
        json.dumps({"id": "b", "plus_code": "V75V+8Q"}),  # 6: short code
        json.dumps({"id": "c", "plus_code": "8FW4V75V+8Q", "style": "long"}),  # 7
        json.dumps({"id": "d", "plus_code": "8FW4V75V+8Q", "colour": "red"}),  # 8
        good[0].to_json(),  # 9: duplicate id
        good[1].to_json(),  # 10
        "[1, 2]",  # 11
    ]
    path = _write(tmp_path / "records.jsonl", "\n".join(lines) + "\n")
    result = load_records([path])
    assert result.records == good
    where = [e.split(": ", 1)[0] for e in result.errors]
    assert where == [f"{path}:{n}" for n in (3, 4, 5, 6, 7, 8, 9, 11)]
    messages = [e.split(": ", 1)[1] for e in result.errors]
    assert messages[0].startswith("bad JSON:")
    assert messages[1] == "field 'id' must be a non-empty string, got None"
    assert "'8FW4V75V+8' is not a valid Plus Code: a single character after '+'" in messages[2]
    assert "'V75V+8Q' is not a valid Plus Code: short code needs a reference" in messages[3]
    assert messages[4] == "field 'style' must be one of brief, stimulate, detailed, got 'long'"
    assert messages[5] == "unknown field(s) colour"
    assert messages[6] == f"duplicate id '{good[0].id}' (first at {path}:1)"
    assert messages[7] == "a record must be a JSON object, got list"


def test_ingest_missing_file(tmp_path: Path) -> None:
    result = load_records(tmp_path / "nope.jsonl")
    assert result.records == []
    assert result.errors[0].startswith(f"{tmp_path / 'nope.jsonl'}:1: cannot read:")


def test_resume_skips_finished_ids(tmp_path: Path) -> None:
    records = build_dataset(styles=("brief",))[:4]
    records_path = tmp_path / "records.jsonl"
    write_jsonl(records, records_path)
    out = tmp_path / "out.jsonl"
    answered = [r for r in records[:3]]
    answered[0].response, answered[1].response = "one", "two"
    torn = answered[2].to_json()[:40]  # a crash mid-write
    out.write_text(answered[0].to_json() + "\n" + answered[1].to_json() + "\n" + torn)
    assert finished_ids(out) == {records[0].id, records[1].id}
    assert finished_ids(tmp_path / "missing.jsonl") == set()

    appender = JsonlAppender(out)  # starts a fresh line after the torn one
    records[3].response = "four"
    appender.write_line(records[3].to_json())
    appender.close()
    assert finished_ids(out) == {records[0].id, records[1].id, records[3].id}

    # Only records[2] is left: with every id answered, generate never touches the network.
    write_jsonl([records[0], records[1], records[3]], records_path)
    summary = generate(records_path, out, "http://127.0.0.1:9")
    assert (summary.done, summary.skipped, summary.failed) == (0, 3, 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actclient")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p1.jsonl"
    args = _parser().parse_args(
        [
            "phase1",
            "build",
            "--out",
            str(out),
            "--styles",
            "brief,detailed",
            "--language",
            "English",
        ]
    )
    assert args.func(args) == 0
    records = load_records(out).records
    assert len(records) == 2 * len(load_places())
    assert Counter(r.style for r in records) == {
        "brief": len(load_places()),
        "detailed": len(load_places()),
    }
    assert "wrote" in capsys.readouterr().err


def test_cli_build_rejects_bad_style() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["phase1", "build", "--out", "x", "--styles", "long"])


def test_cli_generate_args_and_bad_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.API_KEY_ENV, "secret-key-123")
    bad = _write(tmp_path / "bad.jsonl", "{oops\n")
    args = _parser().parse_args(
        ["phase1", "generate", str(bad), "--server", "http://127.0.0.1:9", "--out", "o.jsonl"]
    )
    assert (args.concurrency, args.model, args.api_key) == (4, None, None)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: bad JSON" in err
    assert "secret-key-123" not in err
