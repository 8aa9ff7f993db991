#!/usr/bin/env python3
"""A HOSTILE tether guest (SSH server over a reverse connection) for
e2e/tests/tetherd_hostile.rs, written with AsyncSSH 2.24.1 from docs/PROTOCOL.md.

It dials tetherd's direct guest listener (no link sync), serves SSH as the
guest, and then misbehaves in the way ROLE says, until DURATION seconds have
passed. Like tests/peers/tether_client.py it uses AsyncSSH's private hooks
(`_process_<name>_global_request`, `_process_<type>_open`, raw `send_packet`)
because AsyncSSH has no public API for custom requests and channel types.

usage:
  hostile_guest.py --port PORT --host-key FILE --authorized-key FILE
      --role ROLE --duration SECONDS

roles:
  lists    floods container lists: every reply and a push after push carry
           5000 entries (past the 4096 cap), among them ids with escape sequences and ids of
           another guest's key ("good", "good-1"); between pushes thousands of
           tiny packets (IGNORE, unknown global requests without reply).
  churn    connects, pushes 3000 exited containers with fresh ids, hangs up,
           and again: every link leaves exited containers to remember.
  attach   serves container "hostile": an attach channel gets its output as
           tens of thousands of one-byte packets, stdout and stderr
           alternating (nothing to merge); signal and start requests on a
           control channel are never answered.

Prints one line `hostile_guest: ROLE: N links, M packets` at the end.
"""

import argparse
import asyncio
import sys
import time

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.constants import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_GLOBAL_REQUEST,
    MSG_IGNORE,
)
from asyncssh.packet import Boolean, String, UInt32, UInt64
from asyncssh.session import SSHServerSession

KEX_ALGS = ["curve25519-sha256"]
CIPHERS = ["aes128-gcm@openssh.com"]

# Bytes one attach channel floods before it goes quiet: below tetherd's 2 MiB
# window, so the flood never needs a window adjust.
FLOOD_BYTES = 1_000_000

STATS = {"links": 0, "packets": 0}


def entry(cid: str, state: str = "running", status: int = 0) -> bytes:
    """One container-ids@tether entry (PROTOCOL.md 4.1)."""
    return (
        String(cid.encode("utf-8"))
        + String(b"primary" if cid == "hostile" else b"exec")
        + String(state.encode())
        + UInt32(status)
        + UInt64(0)
        + Boolean(False)
    )


def container_list(ids, state="running", status=0) -> bytes:
    ids = sorted(ids, key=lambda s: s.encode("utf-8"))
    return UInt32(len(ids)) + b"".join(entry(i, state, status) for i in ids)


def big_list() -> bytes:
    """5000 entries (a packet holds about that many): mostly ours, some
    escapes, some another key's ids."""
    ids = [f"hostile-exec{n}" for n in range(5000 - 4)]
    ids += ["good", "good-1", "hostile-\x1b[2J\x1b]0;pwned\x07", "hostile-\nforged log line"]
    return container_list(ids)


class Guest:
    """What the connection answers, by role."""

    reply = b""


GUEST = Guest()


def _container_ids_request(self, packet):
    packet.get_remaining_payload()
    self._report_global_response(GUEST.reply)


asyncssh.SSHServerConnection._process_container_ids_at_tether_global_request = (
    _container_ids_request
)


class FloodSession(SSHServerSession):
    """An attach channel: offset@tether, then one-byte packets until the channel goes."""

    def connection_made(self, chan):
        self._chan = chan
        asyncio.get_event_loop().create_task(self._flood())

    async def _flood(self):
        chan = self._chan
        chan._send_request(b"offset@tether", UInt64(0))
        for n in range(FLOOD_BYTES):
            if chan._send_state != "open":
                return
            if n % 2:
                chan.send_packet(MSG_CHANNEL_EXTENDED_DATA, UInt32(1), String(b"e"))
            else:
                chan.send_packet(MSG_CHANNEL_DATA, String(b"o"))
            STATS["packets"] += 1
            if n % 200 == 0:
                await asyncio.sleep(0)


class QuietSession(SSHServerSession):
    pass


class HostileChannel(SSHChannel):
    """A channel whose signal and start requests are never answered."""

    def __init__(self, conn):
        super().__init__(conn, conn._loop, None, "strict", 2 * 1024 * 1024, 32768)

    def _process_signal_request(self, _packet):
        return None

    def _process_start_at_tether_request(self, _packet):
        return None


def _attach_open(self, packet):
    cid = packet.get_string()
    stdin, stdout, stderr = packet.get_boolean(), packet.get_boolean(), packet.get_boolean()
    packet.get_uint64()
    chan = HostileChannel(self)
    flood = cid == b"hostile" and (stdout or stderr) and not stdin
    return chan, FloodSession() if flood else QuietSession()


asyncssh.SSHServerConnection._process_attach_at_tether_open = _attach_open


async def connect(args):
    STATS["links"] += 1
    return await asyncssh.connect_reverse(
        "127.0.0.1",
        args.port,
        server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_key,
        kex_algs=KEX_ALGS,
        encryption_algs=CIPHERS,
        keepalive_interval=0,
    )


def push(conn, data: bytes):
    conn.send_packet(MSG_GLOBAL_REQUEST, String(b"container-ids@tether"), Boolean(False), data)


async def role_lists(args, end):
    GUEST.reply = big_list()
    conn = await connect(args)
    while time.monotonic() < end:
        push(conn, GUEST.reply)
        for _ in range(2000):
            conn.send_packet(MSG_IGNORE, String(b""))
            conn.send_packet(MSG_GLOBAL_REQUEST, String(b"nonsense@hostile"), Boolean(False))
        STATS["packets"] += 4001
        await asyncio.sleep(0.05)
    conn.close()


async def role_churn(args, end):
    n = 0
    while time.monotonic() < end:
        n += 1
        GUEST.reply = container_list([f"hostile-exec{n * 10000 + i}" for i in range(3000)], "exited", 1)
        try:
            conn = await connect(args)
        except (OSError, asyncssh.Error):
            await asyncio.sleep(0.2)
            continue
        push(conn, GUEST.reply)
        STATS["packets"] += 1
        await asyncio.sleep(0.3)
        conn.close()
        await conn.wait_closed()


async def role_attach(args, end):
    GUEST.reply = container_list(["hostile"])
    conn = await connect(args)
    push(conn, GUEST.reply)
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    conn.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-key", required=True)
    p.add_argument("--authorized-key", required=True)
    p.add_argument("--role", choices=["lists", "churn", "attach"], required=True)
    p.add_argument("--duration", type=float, default=20.0)
    args = p.parse_args()
    end = time.monotonic() + args.duration
    role = {"lists": role_lists, "churn": role_churn, "attach": role_attach}[args.role]
    try:
        await role(args, end)
    except (OSError, asyncssh.Error) as exc:
        # tetherd cutting a hostile link off is a fine outcome.
        print(f"hostile_guest: {args.role}: link ended: {exc}", file=sys.stderr)
    print(f"hostile_guest: {args.role}: {STATS['links']} links, {STATS['packets']} packets")


if __name__ == "__main__":
    asyncio.run(main())
