"""What tests that talk to a server share: a free loopback port, a photo to upload, and `mondrian-assets serve`
started in its own process and polled until it is up, as the app's job service does."""

from __future__ import annotations

import io
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from PIL import Image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def jpeg_bytes(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    """A noise JPEG of `size` (width, height)."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    home: Path

    def post(self, image: bytes, timeout: float = 120, **fields) -> requests.Response:
        """The app's job service's call: part `image` (named like its uploads, no content type) and form fields."""
        return requests.post(f"{self.url}/analyze", files={"image": ("0b7c7e0e_photo.jpg", image)}, data=fields,
                             timeout=timeout)  # fmt: skip

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()

    def usage_rows(self) -> list[dict]:
        with sqlite3.connect(self.home / "mondrian_assets.db") as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM model_usage ORDER BY id")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def launch_service(home: Path, app_dir: Path, base_model: Path, *options: str, timeout_s: float = 120) -> Service:
    """`mondrian-assets serve` on a free port, once /health answers 200 UP (202 loading until then)."""
    port = free_port()
    argv = [sys.executable, "-m", "mondrian_assets.cli", "serve", "--port", str(port), "--home", str(home),
            "--app-dir", str(app_dir), "--base-model", str(base_model), *options]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    service = Service(f"http://127.0.0.1:{port}", process, home)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            answer = requests.get(f"{service.url}/health", timeout=2)
            if answer.status_code == 200 and answer.json()["status"] == "UP":
                return service
            assert answer.status_code == 202 and answer.json()["status"] == "loading"
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    service.stop()
    raise AssertionError(f"the service did not come up within {timeout_s:.0f} s")
