"""Shard announcements: a waiting request wakes on the writer's datagram, not on a poll."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_activations import announce, openai_capture
from vllm_activations.announce import Announcements

pytestmark = pytest.mark.skipif(not announce.SUPPORTED, reason="abstract sockets are Linux-only")


def params(tmp_path, name):
    return {
        "shard_path": str(tmp_path / f"{name}.h5"),
        "error_path": str(tmp_path / f"{name}.error.json"),
    }


def test_a_waiter_wakes_on_the_announcement_of_its_shard_or_error(tmp_path, monkeypatch):
    # With the fallback poll an hour away, only the datagram can wake the waiters.
    monkeypatch.setattr(openai_capture, "FALLBACK_POLL_S", 3600.0)

    async def scenario():
        listener = Announcements(tmp_path)
        assert listener.start()
        assert not Announcements(tmp_path).start()  # one listener per shard directory
        try:
            ok = asyncio.create_task(
                openai_capture.wait_for_shard_async(
                    params(tmp_path, "a"), 3600, announcements=listener
                )
            )
            bad = asyncio.create_task(
                openai_capture.wait_for_shard_async(
                    params(tmp_path, "b"), 3600, announcements=listener
                )
            )
            await asyncio.sleep(0)  # both are waiting now
            (tmp_path / "other.h5").write_bytes(b"x")
            announce.announce(tmp_path / "other.h5")  # someone else's shard wakes nobody
            (tmp_path / "a.h5").write_bytes(b"shard")
            announce.announce(tmp_path / "a.h5")
            assert await asyncio.wait_for(ok, 60) == tmp_path / "a.h5"
            assert not bad.done()
            (tmp_path / "b.error.json").write_text(json.dumps({"error": "rows missing"}))
            announce.announce(tmp_path / "b.error.json")
            with pytest.raises(openai_capture.CaptureFailed, match="rows missing"):
                await asyncio.wait_for(bad, 60)
        finally:
            listener.close()

    asyncio.run(scenario())


def test_announcing_with_nobody_listening_is_harmless(tmp_path):
    announce.announce(tmp_path / "nobody.h5")
    assert announce.channel_name(tmp_path) == announce.channel_name(tmp_path / ".")
    assert announce.channel_name(tmp_path) != announce.channel_name(tmp_path / "sub")
