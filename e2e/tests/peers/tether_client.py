#!/usr/bin/env python3
"""An independent tether APPLIANCE (SSH client) built from docs/PROTOCOL.md alone.

It talks to a tether guest (the SSH server) over a direct TCP link (a guest
`tcp-listen:` link: no link sync, PROTOCOL.md section 1) with AsyncSSH 2.24.1.
AsyncSSH has no public API for custom global requests or channel types, so this
uses its private hooks (`_process_<name>_global_request` and friends):
`SSHConnection._make_global_request`, `SSHChannel._open`, and handler methods
named `_process_<name>_request` / `_process_<name>_global_request`.

usage:
  tether_client.py --host 127.0.0.1 --port PORT --key CLIENT_KEY_FILE \\
      --known-host-key "ssh-ed25519 AAAA..." COMMAND [COMMAND...]

Commands run in order over one SSH connection (the guest serves one connection
at a time); each prints one JSON object (one line) on stdout, in command order.
`attach --background` runs alongside the commands that follow it (e.g. attach,
then signal, then see the exit on the attach channel):

  list
      {"containers": [{"id", "kind", "state", "exit_status", "output_end", "tty"}, ...]}
  attach ID [--from N|live] [--stdin TEXT] [--eof] [--until-exit]
            [--no-stdout] [--no-stderr] [--background] [--window BYTES]
      {"stdout", "stderr", "gaps": [n...], "exit_status": n|null,
       "exit_signal": str|null, "closed": bool, "next_offset": n|null}
  exec CMD
      {"exec_id", "stdout", "stderr", "exit_status", "exit_signal"}
  signal ID NAME
      {"ok": bool}
  start ID
      {"ok": bool}          (start@tether on a control channel, section 4.4)
  fork quiesce|resume
      {"ok": bool, "generation": n|null, "disconnect": {"code", "reason"}|null}
                            (fork@tether, section 4.5; after a quiesce, waits for
                            the guest's DISCONNECT, so it comes last)
  forked
      {"parent_id", "new_id", "generation", "failure", "recovery_us", "pushes_before"}
                            (the child's forked@tether on this connection, 4.5;
                            answered SUCCESS)

A protocol error (or a refused channel, a refused request, a timeout) prints
`tether_client: error: ...` on stderr, plus {"error": {...}} on stdout for a
refused channel open, and exits with status 1. Usage errors exit with 2.
"""

import argparse
import asyncio
import json
import sys
import time

import asyncssh
from asyncssh.constants import EXTENDED_DATA_STDERR, MSG_CHANNEL_CLOSE, MSG_CHANNEL_EOF
from asyncssh.packet import Boolean, PacketDecodeError, SSHPacket, String, UInt64

# PROTOCOL.md 4.2: `from` = 0xFFFFFFFFFFFFFFFF means "live only".
FROM_LIVE = 0xFFFF_FFFF_FFFF_FFFF

# SSH message numbers (RFC 4250) for the global request reply.
MSG_REQUEST_SUCCESS = 81
MSG_REQUEST_FAILURE = 82

# PROTOCOL.md 3.1: the algorithms the guest offers. We offer only those.
KEX_ALGS = ["mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"]
HOST_KEY_ALGS = ["ssh-ed25519"]
CIPHERS = ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
MACS = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-256"]

# PROTOCOL.md 4.1 value sets, checked when decoding.
KINDS = {"primary", "exec"}
STATES = {"created", "running", "exited"}

# `attach` without --until-exit stops after this much silence on the channel.
SILENCE_SECONDS = 2.0


class TetherProtocolError(Exception):
    """The guest did something PROTOCOL.md does not allow."""


class UsageError(Exception):
    """A bad command line (exit status 2)."""


# ---------------------------------------------------------------------------
# PROTOCOL.md 4.1: container-ids@tether
# ---------------------------------------------------------------------------


def decode_container_ids(packet: SSHPacket) -> list:
    """Decodes the container-ids@tether data (reply or push), section 4.1."""
    containers = []
    try:
        count = packet.get_uint32()
        for _ in range(count):
            entry = {
                "id": packet.get_string().decode("utf-8"),
                "kind": packet.get_string().decode("ascii"),
                "state": packet.get_string().decode("ascii"),
                "exit_status": packet.get_uint32(),
                "output_end": packet.get_uint64(),
                "tty": packet.get_boolean(),
            }
            containers.append(entry)
        packet.check_end()
    except (asyncssh.ProtocolError, ValueError, UnicodeDecodeError) as exc:
        raise TetherProtocolError(f"malformed container-ids@tether data: {exc}") from None
    for c in containers:
        if c["kind"] not in KINDS:
            raise TetherProtocolError(f"container-ids@tether: unknown kind {c['kind']!r}")
        if c["state"] not in STATES:
            raise TetherProtocolError(f"container-ids@tether: unknown state {c['state']!r}")
        if c["state"] != "exited" and c["exit_status"] != 0:
            raise TetherProtocolError(
                f"container-ids@tether: {c['id']} is {c['state']} with exit status {c['exit_status']}"
            )
    ids = [c["id"] for c in containers]
    if ids != sorted(ids):
        # "Entries are sorted by id" (byte order of the UTF-8 ids is assumed).
        raise TetherProtocolError(f"container-ids@tether entries are not sorted by id: {ids}")
    return containers


# Pushes (want-reply FALSE, section 4.1) are decoded and kept; a malformed one is
# a protocol error. The appliance must not depend on them, so commands never wait
# for one. AsyncSSH dispatches global requests by method name on the connection.
PUSHES: list = []
PUSH_ERRORS: list = []


def _process_container_ids_at_tether_global_request(self, packet: SSHPacket) -> None:
    try:
        PUSHES.append(decode_container_ids(packet))
    except TetherProtocolError as exc:
        PUSH_ERRORS.append(str(exc))
    # want-reply is FALSE for pushes, so nothing is sent; a guest that did set
    # want-reply would get SUCCESS.
    self._report_global_response(True)


asyncssh.SSHClientConnection._process_container_ids_at_tether_global_request = (
    _process_container_ids_at_tether_global_request
)


async def cmd_list(conn) -> dict:
    """`list`: global request container-ids@tether, want-reply TRUE, no data (4.1)."""
    pkttype, packet = await conn._make_global_request(b"container-ids@tether")
    if pkttype != MSG_REQUEST_SUCCESS:
        raise TetherProtocolError("container-ids@tether was refused (REQUEST_FAILURE)")
    return {"containers": decode_container_ids(packet)}


# ---------------------------------------------------------------------------
# PROTOCOL.md 4.5: fork@tether and forked@tether
# ---------------------------------------------------------------------------

# A child's announcements (decoded), and how the connection ended.
FORKED: list = []
FORKED_ERRORS: list = []
DISCONNECTS: list = []


def _process_forked_at_tether_global_request(self, packet: SSHPacket) -> None:
    try:
        forked = {
            "parent_id": packet.get_string().decode("utf-8"),
            "new_id": packet.get_string().decode("utf-8"),
            "generation": packet.get_uint64(),
            "failure": packet.get_string().decode("utf-8"),
            "recovery_us": packet.get_uint64(),
            # 4.5: first after authentication, before any container-ids push.
            "pushes_before": len(PUSHES),
        }
        packet.check_end()
        FORKED.append(forked)
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        FORKED_ERRORS.append(f"forked@tether: {exc}")
    # want-reply TRUE: this appliance takes the child.
    self._report_global_response(True)


asyncssh.SSHClientConnection._process_forked_at_tether_global_request = (
    _process_forked_at_tether_global_request
)


# A quiesce ends the connection with DISCONNECT reason 11 (BY_APPLICATION),
# which AsyncSSH reports as an orderly close without its description: record
# each DISCONNECT as it arrives, then let AsyncSSH handle it.
MSG_DISCONNECT = 1
_asyncssh_disconnect = asyncssh.connection.SSHConnection._packet_handlers[MSG_DISCONNECT]


def _process_disconnect_recorded(self, pkttype, pktid, packet: SSHPacket) -> None:
    payload = packet.get_remaining_payload()
    peek = SSHPacket(payload)
    DISCONNECTS.append({"code": peek.get_uint32(), "reason": peek.get_string().decode("utf-8", "replace")})
    _asyncssh_disconnect(self, pkttype, pktid, SSHPacket(payload))


asyncssh.connection.SSHConnection._packet_handlers[MSG_DISCONNECT] = _process_disconnect_recorded


async def cmd_fork(conn, args, deadline) -> dict:
    """`fork MODE`: global request fork@tether, want-reply TRUE, `string mode`.
    SUCCESS to a quiesce carries `uint64 generation`; then the guest closes the
    connection with DISCONNECT reason 11."""
    pkttype, packet = await asyncio.wait_for(
        conn._make_global_request(b"fork@tether", String(args.mode)),
        max(0.1, deadline - time.monotonic()),
    )
    ok = pkttype == MSG_REQUEST_SUCCESS
    generation = None
    if ok and args.mode == "quiesce":
        generation = packet.get_uint64()
    if ok:
        packet.check_end()
    disconnect = None
    if ok and args.mode == "quiesce":
        await asyncio.wait_for(conn.wait_closed(), max(0.1, deadline - time.monotonic()))
        if not DISCONNECTS:
            raise TetherProtocolError("a quiesce did not end with a DISCONNECT")
        disconnect = DISCONNECTS[-1]
    return {"ok": ok, "generation": generation, "disconnect": disconnect}


async def cmd_forked(conn, deadline) -> dict:
    """`forked`: the child's announcement, first after authentication (4.5)."""
    while not FORKED and not FORKED_ERRORS:
        if time.monotonic() > deadline:
            raise TetherProtocolError("no forked@tether came")
        await asyncio.sleep(0.01)
    if FORKED_ERRORS:
        raise TetherProtocolError("; ".join(FORKED_ERRORS))
    return FORKED[0]


# ---------------------------------------------------------------------------
# Channels: attach@tether (4.2) and session/exec (4.3)
# ---------------------------------------------------------------------------


class TetherChannel(asyncssh.SSHClientChannel):
    """A client channel that also understands the tether channel requests.

    Subclassing SSHClientChannel keeps its handling of extended data type 1
    (stderr), `exit-status` and `exit-signal`; we add `output-gap@tether` (4.2)
    and `exec-id@tether` (4.3).
    """

    def __init__(self, conn, window=2 * 1024 * 1024, max_pktsize=32768):
        # PROTOCOL.md 3.3: initial window 2 MiB. Raw bytes (encoding None): the
        # offsets of section 4.2 count bytes, and UTF-8 may split across packets.
        super().__init__(conn, conn._loop, "strict", None, "strict", window, max_pktsize)
        self.gaps: list = []
        self.exec_id = None
        self.offset = None
        self.exec_started = False
        self.received_output = False
        self.protocol_errors: list = []
        self.events: list = []  # "exit", "eof", "close" in arrival order

    # AsyncSSH reports EOF to the session only after its start-up pause, and
    # forgets it when CLOSE arrives in the same read; record EOF and CLOSE as
    # packets arrive so the 4.2 end sequence can be checked.
    def _process_eof_recorded(self, pkttype, pktid, packet):
        self.events.append("eof")
        return asyncssh.SSHClientChannel._packet_handlers[MSG_CHANNEL_EOF](self, pkttype, pktid, packet)

    def _process_close_recorded(self, pkttype, pktid, packet):
        self.events.append("close")
        return asyncssh.SSHClientChannel._packet_handlers[MSG_CHANNEL_CLOSE](self, pkttype, pktid, packet)

    _packet_handlers = {
        **asyncssh.SSHClientChannel._packet_handlers,
        MSG_CHANNEL_EOF: _process_eof_recorded,
        MSG_CHANNEL_CLOSE: _process_close_recorded,
    }

    def _process_exit_status_request(self, packet: SSHPacket) -> bool:
        self.events.append("exit")
        return super()._process_exit_status_request(packet)

    def _process_exit_signal_request(self, packet: SSHPacket) -> bool:
        self.events.append("exit")
        return super()._process_exit_signal_request(packet)

    def _process_output_gap_at_tether_request(self, packet: SSHPacket) -> bool:
        # 4.2: want-reply FALSE, uint64 lost-bytes.
        lost = packet.get_uint64()
        packet.check_end()
        self.gaps.append(lost)
        if self._session is not None:
            self._session.activity()
        return True

    def _process_offset_at_tether_request(self, packet: SSHPacket) -> bool:
        # 4.2: want-reply FALSE, uint64 offset; first on every attach channel.
        self.offset = packet.get_uint64()
        packet.check_end()
        return True

    def _process_exec_id_at_tether_request(self, packet: SSHPacket) -> bool:
        # 4.3: want-reply FALSE, string id; sent before the exec reply and
        # before the first output byte.
        exec_id = packet.get_string().decode("utf-8")
        packet.check_end()
        if self.exec_started or self.received_output:
            self.protocol_errors.append("exec-id@tether arrived after the exec reply or after output")
        if self.exec_id is not None:
            self.protocol_errors.append("exec-id@tether sent twice")
        self.exec_id = exec_id
        return True

    async def open_attach(self, session_factory, session_id, stdin, stdout, stderr, from_offset):
        """Opens an attach@tether channel; channel-open extra data per 4.2."""
        # The session must exist before the open is sent: the guest may send
        # channel requests (exit-status of an exited session) in the same read
        # as the confirmation, and AsyncSSH handles requests at once.
        self._session = session_factory()
        self._session.connection_made(self)
        packet = await self._open(
            b"attach@tether",
            String(session_id),
            Boolean(stdin),
            Boolean(stdout),
            Boolean(stderr),
            UInt64(from_offset),
        )
        # The doc defines no data in the open confirmation: expect none.
        packet.check_end()
        self._session.session_started()
        self._conn.create_task(self._start_reading(), self.logger)
        return self._session


class Collector(asyncssh.SSHClientSession):
    """Collects what a channel carries: bytes per stream, exit status/signal, close."""

    def __init__(self, chan_ref):
        self._chan_ref = chan_ref  # a callable returning the TetherChannel
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit_status = None
        self.exit_signal = None
        self.closed = asyncio.Event()
        self.close_exc = None
        self.last_activity = time.monotonic()

    def activity(self):
        self.last_activity = time.monotonic()

    def session_started(self):
        self._chan_ref().exec_started = True

    def data_received(self, data, datatype):
        chan = self._chan_ref()
        chan.received_output = True
        if datatype == EXTENDED_DATA_STDERR:
            self.stderr += data
        elif datatype is None:
            self.stdout += data
        self.activity()

    def exit_status_received(self, status):
        self.exit_status = status
        self.activity()

    def exit_signal_received(self, signal, core_dumped, msg, lang):
        self.exit_signal = signal
        self.activity()

    def eof_received(self):
        self.activity()
        if self.exit_status is not None or self.exit_signal is not None:
            # The end sequence is complete and we have the output: an attach
            # channel is ours to close (4.2); the guest answers with CLOSE.
            self._chan_ref().close()
        # Returning True keeps our side open: AsyncSSH would otherwise answer
        # with EOF, which for tether closes the process's stdin (4.2).
        return True

    def connection_lost(self, exc):
        self.close_exc = exc
        self.closed.set()


def text(data: bytes) -> str:
    return bytes(data).decode("utf-8", errors="replace")


async def run_channel_until(collector, until_exit: bool, deadline: float):
    """Waits for the channel close (until_exit) or for SILENCE_SECONDS of silence."""
    while not collector.closed.is_set():
        now = time.monotonic()
        if now > deadline:
            raise TetherProtocolError("timed out waiting for the channel to finish")
        if not until_exit and now - collector.last_activity >= SILENCE_SECONDS:
            return
        wait = 0.1 if not until_exit else min(0.5, max(0.01, deadline - now))
        try:
            await asyncio.wait_for(collector.closed.wait(), wait)
        except asyncio.TimeoutError:
            pass


def check_end_of_channel(chan, col):
    """4.2 End: exit-status/exit-signal, then EOF, then CLOSE."""
    if col.close_exc is not None:
        raise TetherProtocolError(f"channel closed with an error: {col.close_exc}")
    if chan.events != ["exit", "eof", "close"]:
        raise TetherProtocolError(
            f"the channel ended with {chan.events}, not exit-status/exit-signal, EOF, CLOSE (4.2)"
        )
    if chan.protocol_errors:
        raise TetherProtocolError("; ".join(chan.protocol_errors))


async def cmd_attach(conn, args, deadline) -> dict:
    """`attach`: an attach@tether channel (4.2)."""
    stdin = args.stdin is not None or args.eof
    chan = TetherChannel(conn, window=args.window)
    col = Collector(lambda: chan)
    await chan.open_attach(
        lambda: col,
        args.id,
        stdin,
        not args.no_stdout,
        not args.no_stderr,
        args.from_offset,
    )
    # 4.2 Input: data goes to the process's stdin, EOF closes it.
    if args.stdin is not None:
        chan.write(args.stdin.encode("utf-8"))
    if args.eof:
        chan.write_eof()
    col.activity()
    await run_channel_until(col, args.until_exit, deadline)
    closed = col.closed.is_set()
    if args.until_exit:
        check_end_of_channel(chan, col)
    elif closed:
        # The guest ended the channel by itself: it must be the 4.2 end sequence.
        check_end_of_channel(chan, col)
    else:
        # Closing the channel without EOF is a detach (4.2).
        chan.close()
        if chan.protocol_errors:
            raise TetherProtocolError("; ".join(chan.protocol_errors))
    # 4.2: "The appliance knows from + gaps + bytes received at every moment".
    # That holds only when both streams were asked for and `from` was a number.
    next_offset = None
    if args.from_offset != FROM_LIVE and not args.no_stdout and not args.no_stderr:
        next_offset = args.from_offset + sum(chan.gaps) + len(col.stdout) + len(col.stderr)
    return {
        "stdout": text(col.stdout),
        "stderr": text(col.stderr),
        "gaps": chan.gaps,
        "exit_status": col.exit_status,
        "exit_signal": col.exit_signal,
        "closed": closed,
        "next_offset": next_offset,
    }


async def cmd_exec(conn, args, deadline) -> dict:
    """`exec`: a standard session channel with `exec` (4.3)."""
    chan = TetherChannel(conn)
    col = Collector(lambda: chan)
    # SSHClientChannel.create: opens `session`, sends `exec` with want-reply TRUE.
    await chan.create(
        lambda: col,
        args.command,
        None,  # subsystem
        {},  # env
        False,  # request_pty
        None,
        (),
        {},  # term type, size, modes
        False,
        None,
        None,
        False,  # x11
        False,  # agent forwarding
    )
    if chan.exec_id is None:
        raise TetherProtocolError("no exec-id@tether before the exec reply (4.3)")
    # No stdin for now: EOF at once, as `ssh host cmd </dev/null` does.
    chan.write_eof()
    await run_channel_until(col, True, deadline)
    check_end_of_channel(chan, col)
    return {
        "exec_id": chan.exec_id,
        "stdout": text(col.stdout),
        "stderr": text(col.stderr),
        "exit_status": col.exit_status,
        "exit_signal": col.exit_signal,
    }


async def cmd_signal(conn, args, deadline) -> dict:
    """`signal`: a control channel (4.2: stdin, stdout and stderr FALSE, from live)
    carrying an RFC 4254 6.9 `signal` request with want-reply TRUE."""
    chan = TetherChannel(conn)
    col = Collector(lambda: chan)
    await chan.open_attach(lambda: col, args.id, False, False, False, FROM_LIVE)
    try:
        ok = await asyncio.wait_for(
            chan._make_request(b"signal", String(args.name)),
            max(0.1, deadline - time.monotonic()),
        )
    except asyncio.TimeoutError:
        raise TetherProtocolError("no reply to the signal request") from None
    if col.stdout or col.stderr:
        raise TetherProtocolError("a control channel carried output (4.2)")
    chan.close()  # without EOF: a detach
    return {"ok": bool(ok)}


async def cmd_start(conn, args, deadline) -> dict:
    """`start`: `start@tether` (want-reply TRUE, no data) on a control channel
    releases a start-gated session (4.2, 4.4)."""
    chan = TetherChannel(conn)
    col = Collector(lambda: chan)
    await chan.open_attach(lambda: col, args.id, False, False, False, FROM_LIVE)
    try:
        ok = await asyncio.wait_for(
            chan._make_request(b"start@tether"), max(0.1, deadline - time.monotonic())
        )
    except asyncio.TimeoutError:
        raise TetherProtocolError("no reply to start@tether") from None
    chan.close()
    return {"ok": bool(ok)}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_from(value: str) -> int:
    if value == "live":
        return FROM_LIVE
    n = int(value, 0)
    if not 0 <= n <= FROM_LIVE:
        raise argparse.ArgumentTypeError(f"offset out of range: {value}")
    return n


def command_parsers():
    """One argparse parser per command; `split_commands` cuts argv between them."""
    p_list = argparse.ArgumentParser(prog="list", add_help=False)

    p_attach = argparse.ArgumentParser(prog="attach", add_help=False)
    p_attach.add_argument("id")
    p_attach.add_argument("--from", dest="from_offset", type=parse_from, default=0)
    p_attach.add_argument("--stdin", default=None)
    p_attach.add_argument("--eof", action="store_true")
    p_attach.add_argument("--until-exit", action="store_true")
    p_attach.add_argument("--no-stdout", action="store_true")
    p_attach.add_argument("--no-stderr", action="store_true")
    p_attach.add_argument("--background", action="store_true")
    # 3.3 says the initial window is 2 MiB; a smaller one is for experiments
    # with the `block` overflow policy (section 5).
    p_attach.add_argument("--window", type=int, default=2 * 1024 * 1024)

    p_exec = argparse.ArgumentParser(prog="exec", add_help=False)
    p_exec.add_argument("command")

    p_signal = argparse.ArgumentParser(prog="signal", add_help=False)
    p_signal.add_argument("id")
    p_signal.add_argument("name")

    p_start = argparse.ArgumentParser(prog="start", add_help=False)
    p_start.add_argument("id")

    p_fork = argparse.ArgumentParser(prog="fork", add_help=False)
    p_fork.add_argument("mode", choices=["quiesce", "resume"])

    p_forked = argparse.ArgumentParser(prog="forked", add_help=False)
    return {
        "list": p_list,
        "attach": p_attach,
        "exec": p_exec,
        "signal": p_signal,
        "start": p_start,
        "fork": p_fork,
        "forked": p_forked,
    }


# How many tokens each command and each option consumes, so a sequence of
# commands can be split without ambiguity (an option's value may be any word).
POSITIONALS = {"list": 0, "attach": 1, "exec": 1, "signal": 2, "start": 1, "fork": 1, "forked": 0}
OPTION_VALUES = {"--from": 1, "--stdin": 1, "--window": 1}


def split_commands(tokens):
    commands = []
    i = 0
    while i < len(tokens):
        name = tokens[i]
        if name not in POSITIONALS:
            raise UsageError(f"unknown command {name!r}")
        j = i + 1
        positionals = 0
        while j < len(tokens):
            tok = tokens[j]
            if tok.startswith("--"):
                opt = tok.split("=", 1)[0]
                j += 1 + (OPTION_VALUES.get(opt, 0) if "=" not in tok else 0)
            elif positionals < POSITIONALS[name]:
                positionals += 1
                j += 1
            else:
                break
        commands.append((name, tokens[i + 1 : j]))
        i = j
    if not commands:
        raise UsageError("no command given")
    parsers = command_parsers()
    parsed = []
    for name, rest in commands:
        try:
            parsed.append((name, parsers[name].parse_args(rest)))
        except SystemExit:
            raise UsageError(f"bad arguments for {name}: {rest}") from None
    return parsed


async def connect(opts):
    """SSH connection per PROTOCOL.md 3.1 (algorithms) and 3.2 (publickey auth,
    pinned host key)."""
    host_key = asyncssh.import_public_key(opts.known_host_key)
    if host_key.get_algorithm() != "ssh-ed25519":
        raise TetherProtocolError("--known-host-key must be an ssh-ed25519 key")
    client_key = asyncssh.read_private_key(opts.key)
    conn = await asyncio.wait_for(
        asyncssh.connect(
            opts.host,
            opts.port,
            username=opts.user,  # 3.2: any name; tetherd sends `tetherd`
            client_keys=[client_key],
            known_hosts=([host_key], [], []),
            server_host_key_algs=HOST_KEY_ALGS,
            kex_algs=KEX_ALGS,
            encryption_algs=CIPHERS,
            mac_algs=MACS,
            compression_algs=["none"],
            preferred_auth=["publickey"],
            agent_path=None,
            config=None,
            # 3.1 says the appliance's version line is SSH-2.0-tetherd_<version>;
            # a tcp-listen guest accepts any SSH client (section 1), so we keep
            # AsyncSSH's own.
        ),
        opts.timeout,
    )
    # Belt and braces: the key the guest proved is the one we pinned.
    if conn.get_server_host_key() != host_key:
        conn.close()
        raise TetherProtocolError("the guest's host key is not the pinned key")
    return conn


async def run_command(conn, name, args, deadline) -> dict:
    try:
        if name == "list":
            return await asyncio.wait_for(cmd_list(conn), max(0.1, deadline - time.monotonic()))
        if name == "attach":
            return await cmd_attach(conn, args, deadline)
        if name == "exec":
            return await cmd_exec(conn, args, deadline)
        if name == "start":
            return await cmd_start(conn, args, deadline)
        if name == "fork":
            return await cmd_fork(conn, args, deadline)
        if name == "forked":
            return await cmd_forked(conn, deadline)
        return await cmd_signal(conn, args, deadline)
    except TetherProtocolError as exc:
        raise TetherProtocolError(f"{name} {vars(args)}: {exc}") from None


async def run(opts, commands) -> int:
    """Runs the commands in order on one connection. An `attach --background`
    runs alongside the commands after it (the guest serves one SSH connection
    at a time, so concurrent work has to share the connection). Results are
    printed in command order, each as soon as it and those before it are done."""
    deadline = time.monotonic() + opts.timeout
    conn = await connect(opts)
    tasks = []
    printed = 0

    def print_ready():
        nonlocal printed
        while printed < len(tasks) and tasks[printed].done():
            print(json.dumps(tasks[printed].result()), flush=True)
            printed += 1

    try:
        for name, args in commands:
            task = asyncio.ensure_future(run_command(conn, name, args, deadline))
            tasks.append(task)
            if not getattr(args, "background", False):
                await task
            # A background task that failed ends the run at once.
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()
            print_ready()
        for task in tasks:
            await task
            print_ready()
        if PUSH_ERRORS or FORKED_ERRORS:
            raise TetherProtocolError("; ".join(PUSH_ERRORS + FORKED_ERRORS))
        if opts.verbose:
            print(f"tether_client: {len(PUSHES)} container-ids@tether pushes: {PUSHES}", file=sys.stderr)
    finally:
        for task in tasks:
            task.cancel()
        conn.close()
        await conn.wait_closed()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="A tether appliance (SSH client) built from docs/PROTOCOL.md, on AsyncSSH",
    )
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="OpenSSH ed25519 private key file")
    parser.add_argument("--known-host-key", required=True, help='"ssh-ed25519 AAAA..." of the guest')
    parser.add_argument("--user", default="tetherd")
    parser.add_argument("--timeout", type=float, default=60.0, help="for the whole run (seconds)")
    parser.add_argument("--verbose", action="store_true", help="report guest pushes on stderr")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    try:
        commands = split_commands(opts.command)
    except UsageError as exc:
        print(f"tether_client: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(opts, commands))
    except asyncssh.ChannelOpenError as exc:
        print(json.dumps({"error": {"code": exc.code, "reason": exc.reason}}), flush=True)
        print(f"tether_client: error: channel open refused ({exc.code}): {exc.reason}", file=sys.stderr)
    except (TetherProtocolError, asyncssh.Error, PacketDecodeError) as exc:
        print(f"tether_client: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"tether_client: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
