"""The advisor service under load on loopback, with and without the grammar, measured side by side in one run.

Starts two `mondrian-assets serve` processes on the same base (and adapter, with --adapter): one constrained
(the default), one `--unconstrained`. Rounds alternate between them (so machine load hits both alike); in each,
N concurrent clients post the demo app's photos the way the app's job service does. Prints per service:
requests, errors (must be 0), throughput, p50 / p95 latency, decode tokens/s (from the usage rows), whether the
usage rows match the requests sent; then the constrained / unconstrained decode tokens/s ratio.

    .venv/bin/python bench/bench_serving.py --clients 4 --requests 6 --max-tokens 128
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from mondrian_assets.core.registry import decisions
from mondrian_assets.core.registry.versions import register_version
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.demo.app import generate_demo_app
from mondrian_assets.demo.base_model import ensure_embedded_base_model


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    state_db: Path
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    busy_s: float = 0.0  # wall time of this server's rounds

    def rows(self, first_id: int = 0) -> list[dict]:
        with sqlite3.connect(self.state_db) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM model_usage WHERE id > ? ORDER BY id", (first_id,))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, home: Path, app: Path, base: Path, args: argparse.Namespace, *extra: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "mondrian_assets.cli", "serve", "--port", str(port), "--home", str(home),
            "--app-dir", str(app), "--base-model", str(base), "--mode", args.mode, "--workers", str(args.workers),
            "--max-tokens", str(args.max_tokens), "--max-waiting", str(args.clients), *extra]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(name, url, process, home / "mondrian_assets.db")
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{name}: the service did not come up")


def post(server: Server, image: Path, advisor: str) -> tuple[int, float]:
    tic = time.perf_counter()
    with image.open("rb") as f:
        response = requests.post(f"{server.url}/analyze", files={"image": (image.name, f)},
                                 data={"advisor": advisor, "mode": "baseline", "enable_rag": "false"}, timeout=300)  # fmt: skip
    return response.status_code, time.perf_counter() - tic


def run_round(server: Server, images: list[Path], advisor: str, clients: int) -> None:
    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda image: post(server, image, advisor), images))
    server.busy_s += time.perf_counter() - tic
    for status, latency in results:
        server.statuses.append(status)
        server.latencies.append(latency)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=6, help="requests per client per service")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (requests are split across them)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--mode", default="base", choices=["base", "fine_tuned"])
    parser.add_argument("--adapter", type=Path, help="an adapter dir to register and serve as ansel's active version "
                        "(then --mode fine_tuned; --base-model must be the base it was trained on)")
    parser.add_argument("--base-model", type=Path, help="default: the embedded tiny model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        demo = generate_demo_app(root / "app", seed=11, n_jobs=60, large_images=False)
        base = args.base_model or ensure_embedded_base_model(root / "models")
        images = sorted((demo.app_dir / "source").glob("*.jpg")) + sorted((demo.app_dir / "uploads").glob("*.jpg"))
        total = args.clients * args.requests
        images = (images * (total // max(1, len(images)) + 1))[:total]
        servers = []
        for name, extra in (("constrained", ()), ("unconstrained", ("--unconstrained",))):
            home = root / name
            if args.adapter:  # registered and made active through the registry, as a deploy would
                engine = state_engine(home / "mondrian_assets.db")
                version, _ = register_version(engine, home / "models", "ansel", args.adapter, report=None, metrics={},
                                              gates_passed=True)  # fmt: skip
                decisions.pin(engine, home / "models", "ansel", number=version.number, actor="bench")
            servers.append(start(name, home, demo.app_dir, base, args, *extra))
        try:
            first_ids = {}
            for server in servers:
                run_round(server, images[:2], "ansel", 2)  # warm-up: first-request costs stay out of the figures
                server.latencies.clear(), server.statuses.clear()
                server.busy_s = 0.0
                first_ids[server.name] = max((r["id"] for r in server.rows()), default=0)
            per_round = -(-len(images) // args.rounds)
            for start_at in range(0, len(images), per_round):
                for server in servers:
                    run_round(server, images[start_at : start_at + per_round], "ansel", args.clients)
            tps = {}
            print(f"{args.clients} clients x {args.requests} requests per service, {args.workers} worker(s), "
                  f"max {args.max_tokens} tokens, mode {args.mode}, {args.rounds} alternating rounds")  # fmt: skip
            for server in servers:
                rows = server.rows(first_ids[server.name])
                served = [r for r in rows if r["http_status"] == 200]
                tokens = sum(r["generation_tokens"] or 0 for r in served)
                decode_s = sum((r["generation_tokens"] or 0) / r["generation_tps"] for r in served if r["generation_tps"])
                tps[server.name] = tokens / decode_s if decode_s else 0.0
                errors = sum(s != 200 for s in server.statuses)
                valid = sum(bool(r["parse_ok"]) for r in served)
                print(f"  {server.name:<14} requests {len(server.statuses)}, errors {errors}, "
                      f"throughput {len(server.statuses) / server.busy_s:.2f} req/s, "
                      f"p50 {statistics.median(server.latencies):.2f}s p95 {quantile(server.latencies, 0.95):.2f}s, "
                      f"decode {tps[server.name]:.0f} tokens/s ({tokens} tokens), valid JSON {valid}/{len(served)}, "
                      f"usage rows {len(rows)} {'==' if len(rows) == len(server.statuses) else '!='} requests sent")  # fmt: skip
            if any(s != 200 for server in servers for s in server.statuses):
                raise SystemExit("requests failed: see the errors above (the bench expects none)")
            if tps["unconstrained"]:
                ratio = tps["constrained"] / tps["unconstrained"]
                print(f"constrained / unconstrained decode tokens/s: {ratio:.2f} (the grammar costs {1 - ratio:.0%} of decode speed)")
        finally:
            for server in servers:
                server.process.terminate()
                server.process.wait(timeout=60)


if __name__ == "__main__":
    main()
