"""Fixtures of the adapter tests: one emulator per module and the pipeline's HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import httpx_aiohttp
import pytest_asyncio

from pipeline.emulator import EmulatorServer


@pytest_asyncio.fixture(scope="module")
async def emulator() -> AsyncIterator[EmulatorServer]:
    """An emulator shared by the tests of one module (each test resets it)."""
    async with EmulatorServer() as emu:
        yield emu


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The client the pipeline uses: the httpx API on the aiohttp transport (PERFORMANCE-NOTES)."""
    async with httpx_aiohttp.HttpxAiohttpClient() as c:
        yield c
