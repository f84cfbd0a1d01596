"""TCP <-> Unix-socket relays that let a process in its own network namespace reach exactly the
services it is given (Redis, S3) and nothing else. Plain asyncio, no lorafleet import: it runs
before (and around) the node's process.

Unix sockets are found through the file system, which network namespaces do not separate, so:

    host:  python netns_relay.py host --forward SOCK=PORT ...
           listens on each Unix socket SOCK, forwards every connection to 127.0.0.1:PORT
    node:  unshare -mn python netns_relay.py node --root DIR --forward PORT=SOCK ... -- ARGV...
           (inside fresh mount + network namespaces) makes the whole file system read-only except
           DIR and a private /dev/shm, brings `lo` up, listens on 127.0.0.1:PORT for each
           forward (the service's own port: its URL is unchanged), then runs ARGV and exits
           with its status.

The node wrapper and ARGV share a process group: a kill -9 of the group (LocalFleet.kill) ends
both, and with them the namespaces; the restarted process gets fresh ones. SIGTERM goes to the
whole group too (LocalFleet.stop), so the wrapper ignores it and keeps relaying until ARGV has
shut down gracefully (a worker still talks to Redis while it releases its batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():  # half-close: the peer sees EOF, the other direction goes on
        writer.write_eof()


# Connections being relayed. asyncio keeps only weak references to tasks, and once one side
# has sent EOF its transport leaves the selector: without these, a half-closed connection's
# task would be garbage-collected while the other direction still has data to pass on.
_ACTIVE: set[asyncio.Task[None]] = set()


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    task = asyncio.current_task()
    assert task is not None
    _ACTIVE.add(task)
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    except OSError:  # a reset (a killed peer): drop both sides
        pass
    finally:
        _ACTIVE.discard(task)
        for _, w in (a, b):
            w.close()


def _to_tcp(port: int):  # Unix-socket connection -> 127.0.0.1:port
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await _splice((reader, writer), upstream)
    return handle


def _to_unix(path: str):  # TCP connection (inside the namespace) -> the Unix socket path
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_unix_connection(path)
        except OSError:
            writer.close()
            return
        await _splice((reader, writer), upstream)
    return handle


async def _host(forwards: list[tuple[str, int]]) -> None:
    servers = []
    for sock, port in forwards:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        servers.append(await asyncio.start_unix_server(_to_tcp(port), sock))
    print("ready", flush=True)  # the fixture waits for this line
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _isolate_file_system(root: str) -> None:
    """Only `root` (bound onto itself: its own mount, still writable) and a private /dev/shm stay
    writable; everything else, the other nodes' directories included, is read-only here."""
    for cmd in (["mount", "--make-rprivate", "/"], ["mount", "--bind", root, root],
                ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", "/dev/shm"],
                ["mount", "-o", "remount,bind,ro", "/"], ["ip", "link", "set", "lo", "up"]):
        subprocess.run(cmd, check=True)


async def _node(root: str, forwards: list[tuple[int, str]], argv: list[str]) -> int:
    _isolate_file_system(root)
    for port, sock in forwards:
        await asyncio.start_server(_to_unix(sock), "127.0.0.1", port)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group got it: ARGV shuts down, we relay on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ARGV must not inherit the ignored signals: reset them in the child before it execs
    proc = subprocess.Popen(argv, preexec_fn=_default_signals)  # before any thread exists
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    threading.Thread(target=lambda: loop.call_soon_threadsafe(done.set_result, proc.wait()),
                     daemon=True).start()
    return await done


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main() -> None:
    own, argv = sys.argv[1:], []
    if "--" in own:  # node: everything after "--" is the command, options and all
        at = own.index("--")
        own, argv = own[:at], own[at + 1:]
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["host", "node"])
    p.add_argument("--forward", action="append", default=[], help="host: SOCK=PORT; node: PORT=SOCK")
    p.add_argument("--root", help="node: the one writable directory")
    args = p.parse_args(own)
    pairs = [f.split("=", 1) for f in args.forward]
    if args.mode == "host":
        asyncio.run(_host([(sock, int(port)) for sock, port in pairs]))
        return
    rc = asyncio.run(_node(args.root, [(int(port), sock) for port, sock in pairs], argv))
    sys.stdout.flush()
    os._exit(rc if rc >= 0 else 128 - rc)  # killed by a signal: the shell's convention


if __name__ == "__main__":
    main()
