"""AsyncSSH client for the e2e tests (e2e/tests/asyncssh.rs).

Connects to our server with ML-KEM key exchange, runs a few commands on one
connection (one session channel each) and prints a JSON report on stdout.

usage: asyncssh_client.py HOST PORT CLIENT_KEY KNOWN_HOSTS
"""

import asyncio
import json
import sys

import asyncssh


def result_dict(result):
    signal = result.exit_signal[0] if result.exit_signal else None
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "exit_status": result.exit_status,
        "exit_signal": signal,
    }


async def main(host, port, key, known_hosts):
    async with asyncssh.connect(
        host,
        int(port),
        username="tester",
        client_keys=[key],
        known_hosts=known_hosts,
        kex_algs=["mlkem768x25519-sha256"],
        agent_path=None,
        config=[],
    ) as conn:
        report = {
            "status": result_dict(await conn.run("echo hello; echo oops >&2; exit 7", check=False)),
            "stdin": result_dict(await conn.run("cat", input="from asyncssh\n", check=False)),
            "env": result_dict(await conn.run('echo "$TETHER_E2E"', env={"TETHER_E2E": "yes"}, check=False)),
            "signal": result_dict(await conn.run("kill -TERM $$", check=False)),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
