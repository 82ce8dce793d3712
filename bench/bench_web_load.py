"""Load test of the arena on loopback: clients x votes against a real uvicorn server, which is
killed with SIGKILL mid-way and restarted on the same SQLite database. Prints votes/s, latency
percentiles and acknowledged vs stored votes (each acknowledged vote must be stored exactly once).

    python bench/bench_web_load.py [--clients 20] [--votes 500] [--kill-at 0.5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from prefgym.web.loadtest import run_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--votes", type=int, default=500, help="votes per client")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of votes acknowledged before kill -9 "
                                                                   "(0: no kill)")
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = run_load(Path(folder), args.clients, args.votes, kill_at=args.kill_at)
    print(json.dumps(result, indent=2))
    print(f"\n{result['clients']} clients x {result['votes_per_client']} votes: {result['votes_per_s']} votes/s "
          f"(restart of {result['restart_s']} s excluded), p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms; "
          f"acknowledged {result['acknowledged']}, stored {result['stored']} "
          f"({result['stored_distinct_keys']} distinct), lost {result['lost']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    ok = not result["errors"] and result["lost"] == 0 and result["wrong"] == 0 \
        and result["stored"] == result["acknowledged"] == result["stored_distinct_keys"]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
