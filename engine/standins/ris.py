"""An MLLP listener (the RIS stand-in): python-hl7's asyncio server in a thread.

It listens on 127.0.0.1 (a free port, or the one given), records every
message it receives and answers each with an ACK: ``AA`` by default, or
what :meth:`MllpListener.answer` queued (``AE`` twice, then the default,
say), ``AR``, or nothing at all (``SILENT``: it keeps the connection open
and says nothing, like a RIS that hangs). :meth:`stop` closes the port and
every connection; :meth:`start` opens the same port again.

    with MllpListener() as ris:
        ris.answer("AE", "AE")     # the next two messages get AE, the rest AA
        ...
        ris.wait_for(1)            # the messages received, once there is one
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

import hl7
from hl7.mllp import start_hl7_server

from engine.demo import free_port

SILENT = "silent"  # an answer: none


class MllpListener:
    def __init__(self, port: int | None = None, *, default: str = "AA",
                 text: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.default = default  # AA, AE, AR, CA, CE, CR or SILENT
        self.text = text  # MSA-3 of the ACKs that are not AA/CA
        self.received: list[hl7.Message] = []
        self._answers: deque[str] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._writers: set[Any] = set()

    # -- what it answers ---------------------------------------------------------

    def answer(self, *codes: str) -> None:
        """Answer the next messages with these codes (or SILENT), then the default."""
        with self._lock:
            self._answers.extend(codes)

    def _next_answer(self) -> str:
        with self._lock:
            return self._answers.popleft() if self._answers else self.default

    # -- what it received --------------------------------------------------------

    @property
    def messages(self) -> list[hl7.Message]:
        with self._lock:
            return list(self.received)

    def control_ids(self) -> list[str]:
        return [str(m["MSH.F10"]) for m in self.messages]

    def wait_for(self, n: int, timeout: float = 60.0) -> list[hl7.Message]:
        """The messages received, once there are at least ``n``."""
        deadline = time.time() + timeout
        while len(self.messages) < n:
            if time.time() > deadline:
                raise TimeoutError(f"{len(self.messages)} HL7 message(s), not {n}, "
                                   f"in {timeout} s")
            time.sleep(0.05)
        return self.messages

    # -- life cycle --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MllpListener:
        if self.running:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(start_hl7_server(
                    self._client, self.host, self.port, encoding="utf-8",
                    reuse_address=True))
            except BaseException as exc:  # the port is taken: say so in start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=serve, name=f"mllp-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the port and every open connection (the RIS goes down)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        thread.join(10)
        self._thread = self._loop = self._server = None
        self._writers.clear()

    def __enter__(self) -> MllpListener:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- one connection ----------------------------------------------------------

    async def _client(self, reader: Any, writer: Any) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    message = await reader.readmessage()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                with self._lock:
                    self.received.append(message)
                code = self._next_answer()
                if code == SILENT:
                    continue  # read on: the sender gives up and closes
                ack = message.create_ack(code, message_id=f"ACK{len(self.received)}")
                if code not in ("AA", "CA") and self.text:
                    ack.segment("MSA").assign_field(ack.escape(self.text), 3)
                writer.writemessage(ack)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()
