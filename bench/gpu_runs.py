"""What the GPU benchmarks share: their command line, the 4B-shaped checkpoint, and running each measurement
(ours or the peer's) in a child process of its own, so one variant's memory or crash never touches the next."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_PREFIX = "@@result "  # the line a child prints its measurement on


def parser_for(doc: str | None, peer_script: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, required=True, help=f"the folder of {peer_script} and qwen3vl4b_config.py")
    parser.add_argument("--model-dir", type=Path, help="the 4B-shaped checkpoint (built there if missing)")
    parser.add_argument("--tokenizer-from", type=Path,
                        help="a folder with tokenizer and processor files (default: Qwen's real tokenizer, built here)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def tokenizer_source(path: Path | None) -> Path:
    if path is not None:
        return path
    from mondrian_assets.demo.qwen_vocab_base import ensure_qwen_vocab_base

    return ensure_qwen_vocab_base(Path(tempfile.mkdtemp(prefix="bench-models-")), "4b")


def prepare_checkpoint(args: argparse.Namespace) -> None:
    """Random bf16 weights of the peers' shapes in `args.model_dir` (built once)."""
    from gpu_shapes import build_checkpoint, peer_shapes

    tic = time.perf_counter()
    build_checkpoint(args.model_dir, tokenizer_source(args.tokenizer_from), peer_shapes(args.peers))
    print(f"checkpoint {args.model_dir} ready in {time.perf_counter() - tic:.1f} s", flush=True)


def run_child(script: str, name: str, options: list[str], timeout: float) -> dict:
    """`script --child name options...`; its result line, or the error it ended with."""
    try:
        proc = subprocess.run([sys.executable, script, "--child", name, *options], capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"impl": "ours", "variant": name, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {"impl": "ours", "variant": name, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}"}


def run_peer(script: Path, impl: str, timeout: float) -> list[dict]:
    """The peer's JSON lines (each a measurement), with what it printed before a timeout or a crash."""
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")] + [{"impl": impl, "error": "timeout"}]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows or [{"impl": impl, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}]
