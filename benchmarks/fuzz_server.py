"""The long fuzz run: the mutation fuzzer of ``tests/core/server/fuzz.py`` for 10,000+
requests, against a running server (``--url``) or one it starts (the CI test server's
flags: the embedded SmolLM2 on the cpu platform, a 200,000-byte body limit).

Prints JSON figures (requests, answers by status, 5xx, problems, duration, whether the
fixed greedy request was answered the same before and after) and exits with status 1 if
any rule broke; each problem is printed with the request body that caused it.

    python benchmarks/fuzz_server.py --requests 10000
    python benchmarks/fuzz_server.py --url http://127.0.0.1:8000 --api-key KEY --model M
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.core.server

from tests.core.server import fuzz, fuzz_run
from tests.core.server.conftest import (
    API_KEY,
    MAIN_ARGS,
    MAIN_ENV,
    MODEL,
    ServerProcess,
    metrics,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="default: start a server")
    parser.add_argument("--api-key", default=None, help=f"with --url (default: {API_KEY!r})")
    parser.add_argument("--model", default=MODEL, help="the served model name")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args()

    server = None
    api_key = args.api_key
    if args.url is None:
        log = Path(tempfile.mkdtemp()) / "server.log"
        server = ServerProcess(MAIN_ARGS, MAIN_ENV, log)
        server.wait_ready()
        url, api_key = server.url, API_KEY
    else:
        url = args.url
    try:
        before = fuzz_run.fixed_answer(url, args.model, api_key)
        requests = fuzz.generate(args.seed, args.requests, args.model, api_key)
        report = asyncio.run(fuzz_run.run(url, requests, args.concurrency))
        unchanged = fuzz_run.fixed_answer(url, args.model, api_key) == before
        after = metrics(url)
    finally:
        status = server.stop() if server is not None else None
    figures = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seed": args.seed,
        "concurrency": args.concurrency,
        **report.figures(),
        "fixed_request_unchanged": unchanged,
        "running_after": after.get("kvplane:num_requests_running"),
        "kv_usage_after": after.get("kvplane:kv_cache_usage_perc"),
        "server_exit_status": status,
    }
    for problem in report.problems:
        print(problem, file=sys.stderr)
    for seconds, request in report.slowest:
        print(f"slow: {seconds:.1f} s {request}", file=sys.stderr)
    print(json.dumps(figures, indent=2))
    return 0 if not report.problems and unchanged and status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
