"""A blocking face on `qemu.qmp`'s asyncio QMPClient, for the synchronous launcher.

The client's event loop runs in a daemon thread owned by the session; `execute` submits
coroutines to it and waits. Every QMP event is handed to `on_event` (called in that
thread) as a plain dict.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from qemu.qmp import EventListener, ExecuteError, QMPClient


class QmpError(RuntimeError):
    """A QMP command failed or the monitor is unreachable; the message is QEMU's."""


class QmpSession:
    def __init__(self, socket_path: str, on_event: Callable[[dict], None] | None = None, name: str = "pvlun"):
        self.socket_path = socket_path
        self.on_event = on_event
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._pump: asyncio.Future | None = None
        self.connected = False

    def _submit(self, coro, timeout: float | None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise QmpError(f"QMP timed out after {timeout}s") from None

    def connect(self, timeout: float = 30, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect once QEMU has created its socket; give up if `alive()` turns false."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline and alive():
            if os.path.exists(self.socket_path):
                try:
                    self._submit(self._connect(), timeout=max(1.0, deadline - time.monotonic()))
                    self.connected = True
                    return
                except Exception as exc:  # noqa: BLE001 - QEMU may not be accepting yet
                    last = exc
            time.sleep(0.02)
        raise QmpError(f"cannot connect to QMP at {self.socket_path}: {last or 'QEMU is gone'}")

    async def _connect(self) -> None:
        self._client.register_listener(self._listener)
        try:
            await self._client.connect(self.socket_path)
        except Exception:
            self._client.remove_listener(self._listener)
            raise
        self._pump = asyncio.ensure_future(self._pump_events())

    async def _pump_events(self) -> None:
        async for event in self._listener:
            if self.on_event is not None:
                try:
                    self.on_event(dict(event))
                except Exception:  # noqa: BLE001 - a broken callback must not stop the pump
                    pass

    def execute(self, command: str, arguments: dict | None = None, timeout: float = 30) -> Any:
        if not self.connected:
            raise QmpError("QMP is not connected")
        try:
            return self._submit(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QmpError(f"{command}: {exc}") from None
        except QmpError:
            raise
        except Exception as exc:  # disconnects surface as protocol/state errors
            raise QmpError(f"{command}: {exc or type(exc).__name__}") from None

    def send_fd(self, fd: int, name: str, timeout: float = 30) -> None:
        """Pass an open descriptor to QEMU (SCM_RIGHTS on the QMP socket), known there as `name`."""
        if not self.connected:
            raise QmpError("QMP is not connected")

        async def getfd() -> None:
            self._client.send_fd_scm(fd)  # in the loop's thread: between, not inside, other writes
            await self._client.execute("getfd", {"fdname": name})

        try:
            self._submit(getfd(), timeout)
        except ExecuteError as exc:
            raise QmpError(f"getfd: {exc}") from None
        except QmpError:
            raise
        except Exception as exc:  # noqa: BLE001 - a disconnect surfaces as a protocol/state error
            raise QmpError(f"getfd: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        """Disconnect and stop the loop thread (safe to call more than once)."""
        if self._loop.is_closed():
            return
        try:
            self._submit(self._close(), timeout=5)
        except Exception:  # noqa: BLE001 - closing after QEMU died is expected to complain
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self.connected = False

    async def _close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await self._client.disconnect()
        # commands still waiting for a reply (QEMU exited first) end here, not as
        # "Task was destroyed but it is pending!" when the loop closes
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
