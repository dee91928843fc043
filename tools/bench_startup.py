"""Start-up benchmark: how soon the daemon reports a mistake, and how soon it serves; this tree vs a reference commit.

    python -m tools.bench_startup [--reference REV] [--runs 5] [--out results/bench_startup.json]

The reference (default: the commit where this branch left main, `git merge-base HEAD
main`) is checked out into a temporary git worktree and run with this environment's
Python, its own source folders first on PYTHONPATH; this tree runs the same way.
Each measure starts a real `python -m kakeya_daemon` process, taking the two trees
alternately, and reports the medians and their ratio (ours / reference):

- time to the first error line: a model path that does not exist, and an HTTP port
  another program listens on;
- time to ready: from spawn until the socket answers `hello`, serving the bundled
  default model (already converted: one warm-up start of each tree first, which also
  lets ours keep its probe result, as a user's second start does), and the same from a
  KAKEYA_HOME that keeps no probe result (a first start, conversion aside);
- the import of the daemon's entry module.

Backend, model and dtype are those of the served default model, as `hello` reports them.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from kakeya_client import Client, ConnectionFailed
from kakeya_mlx import platform
from tools.report import write_report

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = (".", "protocol", "daemon", "clients/python")
# Guards a start that never ends; not a measurement threshold.
HANG_GUARD_S = 600.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tree_env(tree: Path) -> dict:
    """The environment that makes `python -m kakeya_daemon` run the code in `tree`."""
    path = os.pathsep.join(str(tree / f) for f in SOURCE_FOLDERS)
    return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}


def first_error_line(tree: Path, args: list[str]) -> tuple[float, str]:
    """Seconds from spawn to the first ERROR line on stderr, and that line; the process must then exit non-zero."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kakeya_daemon", *args],
        cwd=tree, env=tree_env(tree), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stderr:
        if " ERROR " in line:
            break
    elapsed = time.perf_counter() - started
    proc.stderr.read()
    if proc.wait(timeout=HANG_GUARD_S) == 0:
        raise RuntimeError(f"{tree}: expected a failure, the daemon exited 0")
    return elapsed, line.strip()


def time_to_ready(tree: Path, sock: Path, home: Optional[Path] = None) -> tuple[float, dict]:
    """Seconds from spawn until `hello` is answered on `sock`, and the hello result; the daemon is stopped after.

    `home`: a KAKEYA_HOME to start in (the converted models, nothing else kept).
    """
    env = tree_env(tree) if home is None else {**tree_env(tree), "KAKEYA_HOME": str(home)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kakeya_daemon", "--socket", str(sock), "--log-level", "warning"],
        cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{tree}: the daemon exited: {proc.stderr.read().decode(errors='replace')}")
            if time.perf_counter() - started > HANG_GUARD_S:
                raise RuntimeError(f"{tree}: the daemon did not serve within {HANG_GUARD_S:g} s")
            try:
                with Client(sock, timeout=HANG_GUARD_S) as client:
                    elapsed = time.perf_counter() - started
                    hello = client.server_info
                    client.shutdown()
                break
            except ConnectionFailed:
                time.sleep(0.01)
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return elapsed, hello


def import_time(tree: Path) -> float:
    code = "import time; t = time.perf_counter(); import kakeya_daemon.server; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def fresh_home(work: Path) -> Path:
    """A new KAKEYA_HOME that holds the converted models and nothing else (no probe result kept)."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    (home / "models").symlink_to(platform.default_cache_dir() / "models")
    return home


def busy_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="git revision to compare with (default: git merge-base HEAD main)")
    parser.add_argument("--runs", type=int, default=5, help="starts per measure and tree (default 5)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_startup.json"))
    args = parser.parse_args()

    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    reference = git("rev-parse", args.reference or git("merge-base", "HEAD", "main"))
    work = Path(tempfile.mkdtemp(prefix="kk-bench-", dir="/tmp"))
    ref_tree = work / "reference"
    git("worktree", "add", "--detach", str(ref_tree), reference)
    trees = {"reference": ref_tree, "ours": REPO}
    holder = busy_port()
    # Each measure: tree -> (seconds, what to show once).
    measures = {
        "bad_model_path_first_error_s": lambda tree: first_error_line(
            tree, ["--socket", str(work / "bad.sock"), "--model", str(work / "no-such-model")]
        ),
        "busy_http_port_first_error_s": lambda tree: first_error_line(
            tree, ["--socket", str(work / "busy.sock"), "--http-port", str(holder.getsockname()[1])]
        ),
        "ready_s": lambda tree: time_to_ready(tree, work / "ready.sock"),
        "ready_first_start_s": lambda tree: time_to_ready(tree, work / "ready.sock", fresh_home(work)),
        "import_daemon_s": lambda tree: (import_time(tree), ""),
    }
    try:
        log(f"reference {reference[:12]} in {ref_tree}; ours: {REPO}")
        hello = {name: time_to_ready(tree, work / "ready.sock")[1] for name, tree in trees.items()}  # warm-up
        samples = {m: {name: [] for name in trees} for m in measures}
        for run in range(args.runs):
            for measure, fn in measures.items():
                for name, tree in trees.items():
                    seconds, shown = fn(tree)
                    samples[measure][name].append(seconds)
                    if run == 0 and isinstance(shown, str) and shown:
                        log(f"{name}: {shown}")
            log(f"run {run + 1}/{args.runs} done")
    finally:
        holder.close()
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=REPO, capture_output=True)

    model = hello["ours"]["model"]
    results = {}
    for measure, by_tree in samples.items():
        ref_s, ours_s = statistics.median(by_tree["reference"]), statistics.median(by_tree["ours"])
        results[measure] = {"reference": ref_s, "ours": ours_s, "ratio": ours_s / ref_s, "samples": by_tree}
        log(f"{measure:32s} reference {ref_s:7.3f} s   ours {ours_s:7.3f} s   ratio {ours_s / ref_s:.3f}")
    report = {
        "benchmark": "startup",
        "reference": reference,
        "backend": model["backend"],
        "model": model["name"],
        "dtype": {"reference": hello["reference"]["model"]["dtype"], "ours": model["dtype"]},
        "runs": args.runs,
        "results": results,
    }
    out = write_report(report, args.out)
    print(json.dumps({k: {m: round(v[m], 3) for m in ("reference", "ours", "ratio")} for k, v in results.items()}))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
