"""Load the web demo with concurrent chats: `python -m persona.loadtest --url http://127.0.0.1:7860 --chats 20`.

Each simulated user is one `gradio_client.Client`, so one Gradio session with its own conversation
state, in its own thread; it sends `--messages` messages one after another with the page's default
persona and model, then stops. Prints requests sent / succeeded / refused (queue full) / failed and the
latency of the answered ones; exits 1 if any request failed for another reason than a full queue.
Loopback only: a load generator is for your own demo, not someone else's server.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

# Short SPC-like openers; chat i starts at message i so the concurrent prompts differ.
MESSAGES = ("hi! how are you today?", "what do you do for work?", "do you have any pets?",
            "what do you like to do on weekends?", "where did you grow up?", "what is your favorite food?")


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "refused" (Gradio's queue was full) or "failed"
    seconds: float
    error: str = ""


def check_loopback(url: str) -> None:
    """Refuse any URL whose host resolves to an address outside this machine."""
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"{url}: no host")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise ValueError(f"{url}: cannot resolve {host} ({error})") from None
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside:
        raise ValueError(f"{url}: {host} is not a loopback address ({', '.join(outside)}); load only your own demo")


def connect(url: str, chats: int) -> list:
    """One client (one Gradio session) per simulated user."""
    from gradio_client import Client

    # Client(analytics_enabled=False) is overridden by this variable's default, and telemetry would leave loopback
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    with ThreadPoolExecutor(chats) as pool:
        return list(pool.map(lambda _: Client(url, verbose=False, analytics_enabled=False), range(chats)))


def disconnect(clients: list) -> None:
    """Close the clients side by side: each close waits up to a second for its heartbeat stream to end."""
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(lambda client: client.close(), clients))


def replies_to(history: list[dict], text: str) -> bool:
    """Whether the session's chat history, as the client returns it, ends with `text` and a reply to it."""
    return len(history) >= 2 and history[-2]["content"][0]["text"] == text and history[-1]["role"] == "assistant"


def chat(client, first: int, messages: int) -> list[Outcome]:
    """Send `messages` messages in turn; one succeeds when the returned history ends with it and a reply."""
    from gradio_client.utils import QueueError

    outcomes = []
    for turn in range(messages):
        text = MESSAGES[(first + turn) % len(MESSAGES)]
        start = time.perf_counter()
        try:
            _, history, _ = client.predict(text, api_name="/send")
        except QueueError as error:
            outcomes.append(Outcome("refused", time.perf_counter() - start, str(error)))
            continue
        except Exception as error:  # whatever went wrong is what the report is for
            outcomes.append(Outcome("failed", time.perf_counter() - start, f"{type(error).__name__}: {error}"))
            continue
        seconds = time.perf_counter() - start
        replied = replies_to(history, text)
        outcomes.append(Outcome("ok", seconds) if replied else Outcome("failed", seconds, f"no reply to {text!r}"))
    return outcomes


def run_chats(clients: list, messages: int) -> tuple[list[Outcome], float]:
    """All chats at once; the outcomes of every request and the wall time in seconds."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        per_chat = list(pool.map(lambda indexed: chat(indexed[1], indexed[0], messages), enumerate(clients)))
    return [outcome for outcomes in per_chat for outcome in outcomes], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    """Counts per status, the first failure, latency percentiles of the answered requests, replies per second."""
    latencies = [o.seconds for o in outcomes if o.status == "ok"]
    failures = [o.error for o in outcomes if o.status == "failed"]
    summary = {"sent": len(outcomes), "succeeded": len(latencies),
               "refused": sum(o.status == "refused" for o in outcomes), "failed": len(failures),
               "first_error": failures[0] if failures else "", "wall_s": wall_s,
               "throughput": len(latencies) / wall_s if wall_s else 0.0}
    if latencies:
        summary |= {"p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "max_s": max(latencies)}
    return summary


def report(summary: dict) -> str:
    lines = [f"requests: {summary['sent']} sent, {summary['succeeded']} succeeded, "
             f"{summary['refused']} refused (queue full), {summary['failed']} failed"]
    if summary["succeeded"]:
        lines.append(f"latency of answered requests: p50 {summary['p50_s']:.2f} s, p95 {summary['p95_s']:.2f} s, "
                     f"max {summary['max_s']:.2f} s")
    lines.append(f"throughput: {summary['throughput']:.2f} replies/s over {summary['wall_s']:.1f} s")
    if summary["failed"]:
        lines.append(f"first failure: {summary['first_error']}")
    return "\n".join(lines)


def run_load(url: str, chats: int, messages: int) -> dict:
    """Connect `chats` users to the demo at `url`, let each send `messages` messages, summarize the outcomes."""
    check_loopback(url)
    clients = connect(url, chats)
    try:
        return summarize(*run_chats(clients, messages))
    finally:
        disconnect(clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m persona.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="a running `python -m persona web`; loopback")
    parser.add_argument("--chats", type=int, default=20, help="simulated users, all chatting at once")
    parser.add_argument("--messages", type=int, default=3, help="messages each user sends, one after another")
    args = parser.parse_args(argv)
    if args.chats < 1 or args.messages < 1:
        parser.error("--chats and --messages must be at least 1")
    try:
        summary = run_load(args.url, args.chats, args.messages)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(f"error: no demo answers at {args.url}: {error}", file=sys.stderr)
        return 2
    print(report(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
