#!/usr/bin/env python3
"""An independent WebSocket peer for tetherd's attach and exec endpoints.

Connects to URL (a ws:// attach or exec URL) offering the Kubernetes
remote-command subprotocols, optionally sends a resize, stdin and a v5
close-stdin, reads stdout and stderr until the status message (channel 3)
and the close, and prints one JSON object on stdout:

  {"ok": true, "subprotocol": "v5.channel.k8s.io",
   "headers": {"x-tether-offset": "0", "x-tether-tty": "0", "x-tether-exec-id": null},
   "stdout": "...", "stderr": "...", "stdout_b64": "...", "stderr_b64": "...",
   "status": {...metav1.Status...} | null, "exit_code": 0 | null,
   "close_code": 1000 | null, "close_reason": "", "channels": [1, 1, 2, 3], "error": null}

If the server refuses the upgrade it prints {"ok": false, "http_status": N,
"body": <JSON body or text>, ...} and exits 2; on a timeout or protocol error
it prints the partial result with "ok": false and exits 1; otherwise 0.

Usage:
  ws_attach.py ws://127.0.0.1:2378/v1/containers/ID/attach?stdin=1 --stdin 'echo hi' --close-stdin
  ws_attach.py URL --protocol v4 --resize 80x24 --wait-for '$ ' --stdin 'exit 3\n'

With TETHERD_TOKEN set it sends `Authorization: Bearer $TETHERD_TOKEN`.
Stdin texts are UTF-8 with backslash escapes (\\n, \\r, \\t, \\xNN, \\\\).
Needs the `websockets` package (requirements: scripts/requirements.txt).
"""

import argparse
import asyncio
import base64
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def unescape(text):
    """Backslash escapes to bytes, keeping other characters as UTF-8."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            n = text[i + 1]
            simple = {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\", "0": b"\0", "e": b"\x1b"}
            if n in simple:
                out += simple[n]
                i += 2
                continue
            if n == "x" and i + 4 <= len(text):
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
        out += c.encode()
        i += 1
    return bytes(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="ws:// URL of an attach or exec endpoint")
    p.add_argument("--stdin", action="append", default=[], metavar="TEXT", help="send TEXT on stdin (repeatable)")
    p.add_argument("--close-stdin", action="store_true", help="then close stdin ([255, 0], v5 only)")
    p.add_argument("--resize", metavar="WxH", help="send a resize first, e.g. 80x24")
    p.add_argument("--origin", metavar="ORIGIN", help="send this Origin header, as a browser would")
    p.add_argument("--protocol", choices=["v5", "v4", "both"], default="both", help="subprotocols to offer")
    p.add_argument("--wait-for", metavar="TEXT", help="send stdin only once stdout contains TEXT")
    p.add_argument("--stdin-delay", type=float, default=0.0, help="seconds between stdin chunks")
    p.add_argument("--leave-when", metavar="TEXT", help="disconnect (without waiting for the exit) once stdout contains TEXT")
    p.add_argument("--timeout", type=float, default=30.0, help="overall seconds (default 30)")
    p.add_argument("--open-timeout", type=float, default=60.0, help="seconds for the upgrade (attach may wait 50 s for the container)")
    return p.parse_args(argv)


async def session(args, result, stdout, stderr):
    offer = {"v5": [V5], "v4": [V4], "both": [V5, V4]}[args.protocol]
    seen = asyncio.Event()

    def contains(text):
        return text is not None and text.encode() in stdout

    try:
        headers = {}
        token = os.environ.get("TETHERD_TOKEN")
        if token:
            headers["Authorization"] = "Bearer " + token
        ws = await connect(args.url, subprotocols=offer, open_timeout=args.open_timeout, max_size=None,
                           compression=None, additional_headers=headers, origin=args.origin)
    except InvalidStatus as e:
        body = bytes(e.response.body or b"")
        try:
            body = json.loads(body)
        except ValueError:
            body = body.decode(errors="replace")
        result.update(ok=False, http_status=e.response.status_code, body=body, error=str(e))
        return 2

    async with ws:
        result["subprotocol"] = ws.subprotocol
        headers = ws.response.headers
        result["headers"] = {h: headers.get(h) for h in ("x-tether-offset", "x-tether-tty", "x-tether-exec-id")}

        async def writer():
            if args.resize:
                w, h = (int(v) for v in args.resize.lower().split("x"))
                await ws.send(bytes([RESIZE]) + json.dumps({"Width": w, "Height": h}).encode())
            if args.wait_for is not None:
                await seen.wait()
            for i, text in enumerate(args.stdin):
                if i and args.stdin_delay:
                    await asyncio.sleep(args.stdin_delay)
                await ws.send(bytes([STDIN]) + unescape(text))
            if args.close_stdin:
                if ws.subprotocol != V5:
                    raise RuntimeError(f"--close-stdin needs {V5}, the server chose {ws.subprotocol}")
                await ws.send(bytes([CLOSE, STDIN]))

        write_task = asyncio.create_task(writer())
        try:
            async for msg in ws:
                if isinstance(msg, str) or not msg:
                    continue
                channel, data = msg[0], msg[1:]
                result["channels"].append(channel)
                if channel == STDOUT:
                    stdout.extend(data)
                elif channel == STDERR:
                    stderr.extend(data)
                elif channel == STATUS:
                    status = json.loads(data)
                    result["status"] = status
                    result["exit_code"] = exit_code(status)
                if contains(args.wait_for):
                    seen.set()
                if contains(args.leave_when):
                    result["left"] = True
                    break
        except ConnectionClosed:
            pass
        finally:
            if write_task.done() and not write_task.cancelled() and write_task.exception():
                raise write_task.exception()
            write_task.cancel()
        result["close_code"] = ws.close_code
        result["close_reason"] = ws.close_reason
    result["ok"] = result["status"] is not None or bool(result.get("left"))
    return 0 if result["ok"] else 1


def exit_code(status):
    """The exit code a metav1.Status reports, as kubectl reads it."""
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes", []):
            if cause.get("reason") == "ExitCode":
                return int(cause.get("message"))
    return None


def finish(result, stdout, stderr):
    result["stdout"] = stdout.decode(errors="replace")
    result["stderr"] = stderr.decode(errors="replace")
    result["stdout_b64"] = base64.b64encode(bytes(stdout)).decode()
    result["stderr_b64"] = base64.b64encode(bytes(stderr)).decode()


def main(argv):
    args = parse_args(argv)
    result = {"ok": False, "subprotocol": None, "headers": {}, "stdout": "", "stderr": "", "status": None,
              "exit_code": None, "close_code": None, "close_reason": None, "channels": [], "error": None}
    stdout, stderr = bytearray(), bytearray()
    try:
        code = asyncio.run(asyncio.wait_for(session(args, result, stdout, stderr), args.timeout))
    except asyncio.TimeoutError:
        result["error"] = f"timed out after {args.timeout} s"
        code = 1
    except Exception as e:  # report every failure as JSON
        result["error"] = f"{type(e).__name__}: {e}"
        code = 1
    finish(result, stdout, stderr)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
