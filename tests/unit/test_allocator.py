"""The malloc tuning that keeps payload buffers in the heap (glibc only)."""

from __future__ import annotations

import platform

import pytest

from serve_app.allocator import keep_payload_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_are_raised_on_glibc() -> None:
    assert keep_payload_memory() is True
    assert keep_payload_memory() is True  # idempotent: every replica may call it
