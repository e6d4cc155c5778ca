"""Phase 1: tour-stop prompts for real places, named by Plus Code, and their generated texts.

`prompts` builds the user's tour-guide prompt, `dataset` turns the shipped places into records,
`ingest` reads records back (JSONL or the user's `<plus code>_<lang>.txt` samples), `generate`
fills in responses through the server's OpenAI route, and `cli` wires them into `actclient`.
"""
