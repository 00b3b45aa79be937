"""The app under load: `python app.py` started as users start it, then 8 and 32 concurrent gradio_client
users sending photos for a fixed time. Prints start-up time, requests served, errors, latency p50/p95 and the
server's memory.

    python benchmarks/app_load.py [--seconds 60] [--users 8 32]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from benchmarks.common import EXAMPLES, ROOT, machine  # noqa: E402

PHOTOS = [EXAMPLES / name for name in ("obama.jpg", "three_portraits.jpg", "astronaut.jpg", "chelsea_the_cat.jpg")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_app(port: int) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env={**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return process, time.perf_counter() - started
        except OSError as error:
            if process.poll() is not None:
                raise SystemExit("the app exited during start-up") from error
            time.sleep(0.1)


def user(url: str, deadline: float, latencies: list[float], errors: list[str]) -> None:
    try:
        client = Client(url, verbose=False)
    except Exception as error:
        errors.append(f"connect: {type(error).__name__}: {error}")
        return
    i = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            client.predict(handle_file(str(PHOTOS[i % len(PHOTOS)])), False, api_name="/predict")
            latencies.append(time.perf_counter() - started)
        except Exception as error:  # counted and reported, never hidden
            errors.append(f"{type(error).__name__}: {error}")
        i += 1


def phase(url: str, users: int, seconds: float) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=user, args=(url, deadline, latencies, errors)) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--users", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process, startup = start_app(port)
    url = f"http://127.0.0.1:{port}/"
    try:
        print(f"Machine: {machine()}")
        print(f"  app ready to serve {startup:.1f} s after `python app.py`")
        ready = rss_mb(process.pid)
        phase(url, 2, 5)  # warm up: first requests load encoders and fill caches, which is not growth
        run_start = rss_mb(process.pid)
        print(f"  server memory {ready:.0f} MB when ready, {run_start:.0f} MB after a 5 s warm-up with 2 users")
        for users in args.users:
            before = rss_mb(process.pid)
            latencies, errors = phase(url, users, args.seconds)
            after = rss_mb(process.pid)
            served = np.asarray(latencies or [float("nan")]) * 1000
            print(
                f"  {users} users for {args.seconds:.0f} s: {len(served)} served ({len(served) / args.seconds:.1f}/s), {len(errors)} errors, "
                f"p50 {np.percentile(served, 50):.0f} ms, p95 {np.percentile(served, 95):.0f} ms, "
                f"server memory {before:.0f} -> {after:.0f} MB ({(after - before) / before:+.1%})"
            )
            for error in sorted(set(errors))[:5]:
                print(f"    error: {error}")
        run_end = rss_mb(process.pid)
        print(f"  over the whole run: server memory {run_start:.0f} -> {run_end:.0f} MB ({(run_end - run_start) / run_start:+.1%})")
        print(f"  server still serving: {process.poll() is None}")
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
