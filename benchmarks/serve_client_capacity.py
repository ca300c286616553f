"""How many streamed events per second `kvplane bench serve`'s client can read.

A loopback server (a child process, raw asyncio) answers every completion request with
``--output-len`` events ``--gap-ms`` apart, as a fast engine would; the client runs
``--num-prompts`` requests at once. With an unlimited client the run takes about
``output_len * gap`` seconds; the client's CPU time per event says what it costs.

    python benchmarks/serve_client_capacity.py --num-prompts 500 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time
from typing import Any


def _chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _serve(port: int, output_len: int, gap: float) -> None:
    """The fake server: one response per connection (the client asks to close)."""
    events = [
        _chunked(
            b"data: "
            + json.dumps(
                {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            ).encode()
            + b"\n\n"
        )
        for i in range(output_len)
    ]
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": output_len}}
    tail = _chunked(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(event)
            await writer.drain()
            await asyncio.sleep(gap)
        writer.write(tail + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--gap-ms", type=float, default=6.0)
    args = parser.parse_args()

    from kvplane.bench.datasets import BenchRequest
    from kvplane.bench.serve import run_serve
    from kvplane.cli.bench import _event_loop_runner

    port = _free_port()
    server = multiprocessing.Process(
        target=_serve, args=(port, args.output_len, args.gap_ms / 1000), daemon=True
    )
    server.start()
    time.sleep(1.0)
    requests = [BenchRequest([1, 2, 3], args.output_len) for _ in range(args.num_prompts)]
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        metrics: dict[str, Any]
        metrics, _ = _event_loop_runner()(
            run_serve(f"http://127.0.0.1:{port}", "m", requests, float("inf"), None, 0)
        )
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        server.terminate()
    num_events = args.num_prompts * args.output_len
    print(
        f"{args.num_prompts} streams x {args.output_len} events, {args.gap_ms} ms apart: "
        f"wall {wall:.2f} s (unlimited: {args.output_len * args.gap_ms / 1000:.2f} s), "
        f"client CPU {cpu:.2f} s = {1e6 * cpu / num_events:.1f} us per event; "
        f"failed {metrics['failed']}, mean TTFT {metrics['mean_ttft_ms']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
