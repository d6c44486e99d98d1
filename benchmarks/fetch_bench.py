"""How fast, and in how much memory, `fetch_to_file` downloads a large object, next to curl.

A 1 GiB file of random bytes is served over loopback by a small sendfile-based HTTP server
in its own process (so it does not share the fetcher's event loop or GIL). After one untimed
warm-up download, each repetition runs four downloads in rotating order, each into a file
that is then deleted:

* `curl`: `curl -s -o <file>`, the peer;
* `fetch_to_file`: our fetcher with its default policy (no digest: the same work as curl,
  and how the model side fetches), policy allowing 127.0.0.1 only. The goal is on this one:
  fetch_to_file / curl >= 0.9;
* `curl_then_sha256`: curl, then `openssl dgst -sha256` on the file (the same OpenSSL
  sha256 that Python's hashlib uses; coreutils' sha256sum is 6x slower here, a strawman);
* `fetch_to_file_sha256`: our fetcher with `hash_body=True`, hashing while it downloads.

Our fetches run in a child process doing nothing else, which reports its own timing, the
growth of its peak RSS (getrusage ru_maxrss, cross-checked by sampling /proc/self/statm
every few milliseconds) over its RSS just before the fetch, and, after the timed part, the
sha256 of the file it wrote, which must match the source.

Throughput is bytes / transfer time in MB/s (10^6 bytes per second): curl's own
`time_total` (plus openssl's wall time for the digest variant), and the time around
`fetch_to_file` in the child; neither counts process start-up. CPU seconds per GiB
(user + system, worker threads included) show where the time goes. Goals: fetch_to_file /
curl >= 0.9 (median over repetitions), RSS growth < 64 MiB.

With `--https` the same runs go over TLS, as pre-signed object-store URLs do: the server
wraps its socket with a throwaway self-signed certificate for media.example.test (made by
`openssl req`), curl gets `--cacert` and `--resolve`, our fetch gets the certificate as
`FetchPolicy.ca_file` and a resolver that answers 127.0.0.1 for that one name. Over TLS the
server's encryption on the other core sets the pace for both.

    .venv/bin/python benchmarks/fetch_bench.py           # about a minute and a half on 2 cores
    .venv/bin/python benchmarks/fetch_bench.py --https   # about three minutes

Writes benchmarks/results/fetch_bench.json and fetch_bench.png (fetch_bench_https.* with
--https), prints a table, and deletes the 1 GiB file, the certificate and every download.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
from truss_llm.media import socket_backend
from truss_llm.media.fetch import FetchPolicy, fetch_to_file

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024
DEFAULT_SIZE_MIB = 1024
DEFAULT_REPETITIONS = 7
GENERATE_BLOCK = 4 * MiB  # random block written repeatedly, with a counter to vary it
SENDFILE_BLOCK = 8 * MiB
RSS_SAMPLE_INTERVAL_S = 0.005
SERVER_START_TIMEOUT_S = 10
FETCH_TIMEOUT_S = 120
SHA256_PROBE_BLOCKS = 64
TLS_SEND_BLOCK = 1 * MiB
TLS_HOSTNAME = "media.example.test"  # resolved to 127.0.0.1 by the benchmark itself
TOOLS = ("curl", "fetch_to_file", "curl_then_sha256", "fetch_to_file_sha256")
OURS = ("fetch_to_file", "fetch_to_file_sha256")
GOAL_RATIO = 0.9
GOAL_RSS_GROWTH_MIB = 64
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- the server process -----------------------------------------------------------------------


class _FileHandler(BaseHTTPRequestHandler):
    """Serves the one file: with sendfile over plain HTTP (the kernel copies, Python stays
    out of the way), in large blocks over TLS (OpenSSL encrypts, Python barely loops)."""

    protocol_version = "HTTP/1.1"
    file_path: Path

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        size = self.file_path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.flush()
        if isinstance(self.connection, ssl.SSLSocket):
            with self.file_path.open("rb") as source:
                while block := source.read(TLS_SEND_BLOCK):
                    self.connection.sendall(block)
            return
        with self.file_path.open("rb") as source:
            offset = 0
            while offset < size:
                sent = os.sendfile(self.connection.fileno(), source.fileno(), offset,
                                   min(SENDFILE_BLOCK, size - offset))
                if sent == 0:
                    break
                offset += sent


def serve(file_path: Path, certificate: Path | None) -> None:
    """Run the server on a free loopback port; print the port, serve until terminated."""
    _FileHandler.file_path = file_path
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, certificate.with_suffix(".key"))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


# --- the fetch process ------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _loopback_resolver(host: str, port: int) -> list[str]:
    """TLS_HOSTNAME is 127.0.0.1; no other name is looked up, let alone dialled."""
    if host != TLS_HOSTNAME:
        raise OSError(f"the benchmark resolves only {TLS_HOSTNAME}")
    return ["127.0.0.1"]


def fetch_once(url: str, directory: Path, sha256: bool, ca_file: Path | None,
               ) -> dict[str, Any]:
    """Fetch `url` once in this process; report time, RSS growth and the file's sha256."""
    policy = FetchPolicy(allow_http=True, extra_allowed_hosts=("127.0.0.1", TLS_HOSTNAME),
                         allowed_networks=("127.0.0.1/32",), max_bytes=4 * 1024 * MiB,
                         total_timeout_s=FETCH_TIMEOUT_S, hash_body=sha256,
                         ca_file=None if ca_file is None else str(ca_file))
    peak_sampled = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_sampled
        while not stop.is_set():
            peak_sampled = max(peak_sampled, _rss_bytes())
            time.sleep(RSS_SAMPLE_INTERVAL_S)

    async def run() -> tuple[float, Any]:
        # Warm what a serving process has warm already: the event loop, the I/O threads.
        await asyncio.sleep(0)
        started = time.perf_counter()
        result = await fetch_to_file(url, policy, directory=directory,
                                     resolver=_loopback_resolver)
        return time.perf_counter() - started, result

    rss_before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_before = _cpu_s()
    seconds, result = asyncio.run(run())
    cpu_s = _cpu_s() - cpu_before
    stop.set()
    sampler.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    on_disk = _file_sha256(result.path)  # after the timed part: the bytes really written
    result.path.unlink()
    return {
        "seconds": seconds, "cpu_s": cpu_s, "size": result.size,
        "sha256_computed": result.sha256, "sha256_on_disk": on_disk,
        "rss_before": rss_before, "rss_peak_sampled": peak_sampled,
        "rss_growth": max(maxrss_after - max(maxrss_before, rss_before),
                          peak_sampled - rss_before, 0),
    }


def _file_sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


# --- the driver ---------------------------------------------------------------------------------


def generate(path: Path, size: int) -> str:
    """Write `size` incompressible bytes; return their sha256."""
    digest = hashlib.sha256()
    block = bytearray(os.urandom(GENERATE_BLOCK))
    with path.open("wb") as out:
        for index in range(size // GENERATE_BLOCK):
            block[:8] = index.to_bytes(8, "little")
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Endpoint:
    """Where the file is served: the URL, the port, and the certificate for https."""

    url: str
    port: int
    certificate: Path | None
    downloads: Path

    def curl_options(self) -> list[str]:
        if self.certificate is None:
            return []
        return ["--cacert", str(self.certificate),
                "--resolve", f"{TLS_HOSTNAME}:{self.port}:127.0.0.1"]


def make_certificate(directory: Path) -> Path:
    """A self-signed certificate for TLS_HOSTNAME (its own CA), the key beside it."""
    certificate = directory / "server.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={TLS_HOSTNAME}",
         "-addext", f"subjectAltName=DNS:{TLS_HOSTNAME}",
         "-keyout", str(certificate.with_suffix(".key")), "-out", str(certificate)],
        check=True, capture_output=True, timeout=FETCH_TIMEOUT_S)
    return certificate


def run_curl(endpoint: Endpoint, then_sha256: bool = False) -> dict[str, Any]:
    target = endpoint.downloads / "curl.out"
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(
        ["curl", "-s", "-S", "-f", *endpoint.curl_options(), "-o", str(target),
         "-w", "%{time_total} %{size_download}", endpoint.url],
        check=True, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    seconds, size = completed.stdout.split()
    run: dict[str, Any] = {"seconds": float(seconds), "size": int(size)}
    if then_sha256:
        started = time.perf_counter()
        digest = subprocess.run(["openssl", "dgst", "-sha256", "-r", str(target)], check=True,
                                capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        run["seconds"] += time.perf_counter() - started
        run["sha256_computed"] = digest.stdout.split()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    target.unlink()
    run["cpu_s"] = ((usage.ru_utime - usage_before.ru_utime)
                    + (usage.ru_stime - usage_before.ru_stime))
    return run


def run_curl_then_sha256(endpoint: Endpoint) -> dict[str, Any]:
    return run_curl(endpoint, then_sha256=True)


def run_ours(endpoint: Endpoint, sha256: bool = False) -> dict[str, Any]:
    command = [sys.executable, __file__, "--fetch", endpoint.url,
               "--directory", str(endpoint.downloads)]
    if endpoint.certificate is not None:
        command += ["--ca-file", str(endpoint.certificate)]
    if sha256:
        command.append("--sha256")
    completed = subprocess.run(command, check=True, capture_output=True, text=True,
                               timeout=FETCH_TIMEOUT_S)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_ours_with_sha256(endpoint: Endpoint) -> dict[str, Any]:
    return run_ours(endpoint, sha256=True)


def hashlib_sha256_mb_per_s() -> float:
    """This machine's sha256 speed on one core, for reading the CPU columns."""
    block = os.urandom(GENERATE_BLOCK)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(SHA256_PROBE_BLOCKS):
        digest.update(block)
    return SHA256_PROBE_BLOCKS * len(block) / (time.perf_counter() - started) / 1e6


def mb_per_s(run: dict[str, Any]) -> float:
    return run["size"] / run["seconds"] / 1e6


LABELS = {
    "curl": "curl -o",
    "fetch_to_file": "fetch_to_file (default: no digest, as the model fetches)",
    "curl_then_sha256": "curl -o, then openssl dgst -sha256",
    "fetch_to_file_sha256": "fetch_to_file, hash_body=True",
}
COLORS = {"curl": "#888888", "fetch_to_file": "#1f77b4", "curl_then_sha256": "#c7c7c7",
          "fetch_to_file_sha256": "#aec7e8"}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    reps = sorted({r["repetition"] for r in runs})
    fig, (speed, cpu, memory) = plt.subplots(1, 3, figsize=(16, 5.2))
    width = 0.2
    for index, tool in enumerate(TOOLS):
        offset = (index - 1.5) * width
        mine = {r["repetition"]: r for r in runs if r["tool"] == tool}
        speed.bar([n + offset for n in reps], [mine[n]["mb_per_s"] for n in reps], width,
                  label=LABELS[tool], color=COLORS[tool])
        cpu.bar([n + offset for n in reps], [mine[n]["cpu_s_per_gib"] for n in reps], width,
                label=LABELS[tool], color=COLORS[tool])
    summary = results["summary"]
    for axis, unit in ((speed, "MB/s (10^6 B/s)"), (cpu, "CPU s per GiB (user + sys)")):
        axis.set_xticks(reps, [f"rep {n}" for n in reps])
        axis.set_ylabel(unit)
    speed.set_title(f"{results['config']['size_mib']} MiB over loopback "
                    f"({results['config']['scheme']}), "
                    f"{results['config']['cpus']} cores: fetch_to_file / curl = "
                    f"{summary['ratio_median']:.2f}\n(with sha256: "
                    f"{summary['ratio_sha256_median']:.2f} of curl + openssl)", fontsize=10)
    speed.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    cpu.set_title(f"CPU per GiB (hashlib sha256 alone: "
                  f"{results['config']['sha256_cpu_s_per_gib']:.2f} s/GiB)", fontsize=10)
    for index, tool in enumerate(OURS):
        growth = [r["rss_growth"] / MiB for r in runs if r["tool"] == tool]
        memory.bar([n + (index - 0.5) * 0.35 for n in reps], growth, 0.35, label=LABELS[tool],
                   color=COLORS[tool])
    memory.axhline(GOAL_RSS_GROWTH_MIB, color="red", linestyle="--", label="goal")
    memory.set_xticks(reps, [f"rep {n}" for n in reps])
    memory.set_ylabel("MiB")
    memory.set_title("fetch_to_file: peak RSS growth during the fetch", fontsize=10)
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'rep':>3}  {'tool':<24} {'seconds':>8} {'MB/s':>7} {'CPU s/GiB':>10} "
          f"{'RSS growth':>11}")
    for run in results["runs"]:
        growth = f"{run['rss_growth'] / MiB:7.1f} MiB" if "rss_growth" in run else ""
        print(f"{run['repetition']:>3}  {run['tool']:<24} {run['seconds']:8.2f} "
              f"{run['mb_per_s']:7.0f} {run['cpu_s_per_gib']:10.2f} {growth:>11}")
    s = results["summary"]
    medians = ", ".join(f"{tool} {s['mb_per_s_median'][tool]:.0f}" for tool in TOOLS)
    print(f"\nmedian MB/s: {medians}")
    print(f"fetch_to_file / curl {s['ratio_median']:.2f} (goal >= {GOAL_RATIO}); with sha256 "
          f"{s['ratio_sha256_median']:.2f} of curl + openssl; max RSS growth "
          f"{s['max_rss_growth_mib']:.1f} MiB (goal < {GOAL_RSS_GROWTH_MIB})")


def benchmark(size_mib: int, repetitions: int, workdir: Path | None, https: bool,
              ) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="fetch-bench-", dir=workdir))
    server: subprocess.Popen[str] | None = None
    runners = {"curl": run_curl, "fetch_to_file": run_ours,
               "curl_then_sha256": run_curl_then_sha256,
               "fetch_to_file_sha256": run_ours_with_sha256}
    runs = []
    try:
        source = directory / "object.bin"
        started = time.monotonic()
        expected = generate(source, size_mib * MiB)
        print(f"generated {size_mib} MiB in {time.monotonic() - started:.1f} s", flush=True)
        certificate = make_certificate(directory) if https else None
        command = [sys.executable, __file__, "--serve", str(source)]
        if certificate is not None:
            command += ["--certificate", str(certificate)]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        host = TLS_HOSTNAME if https else "127.0.0.1"
        endpoint = Endpoint(url=f"{'https' if https else 'http'}://{host}:{port}/object.bin",
                            port=port, certificate=certificate,
                            downloads=directory / "downloads")
        endpoint.downloads.mkdir()
        run_curl(endpoint)  # untimed warm-up: the fresh source file's dirty pages
        for repetition in range(1, repetitions + 1):
            shift = (repetition - 1) % len(TOOLS)  # rotate who goes first
            for tool in TOOLS[shift:] + TOOLS[:shift]:
                run = runners[tool](endpoint)
                check(tool, run, size_mib * MiB, expected)
                run.update(tool=tool, repetition=repetition, mb_per_s=mb_per_s(run),
                           cpu_s_per_gib=run["cpu_s"] / (run["size"] / (1024 * MiB)))
                runs.append(run)
                print(f"rep {repetition} {tool}: {run['mb_per_s']:.0f} MB/s", flush=True)
    finally:
        if server is not None:
            server.terminate()  # our own child, by its handle
            server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)  # the 1 GiB file and any download
    medians = {tool: statistics.median(r["mb_per_s"] for r in runs if r["tool"] == tool)
               for tool in TOOLS}
    by_rep = {(r["tool"], r["repetition"]): r["mb_per_s"] for r in runs}
    sha256_speed = hashlib_sha256_mb_per_s()
    return {
        "config": {
            "size_mib": size_mib, "repetitions": repetitions, "cpus": os.cpu_count(),
            "scheme": "https" if https else "http",
            "python": platform.python_version(), "httpx": httpx.__version__,
            "httpcore": httpcore.__version__,
            "body_buffer_bytes": socket_backend.BODY_BUFFER_BYTES,
            "curl": subprocess.run(["curl", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0],
            "openssl": subprocess.run(["openssl", "version"], capture_output=True,
                                      text=True).stdout.strip(),
            "sha256_mb_per_s_one_core": sha256_speed,
            "sha256_cpu_s_per_gib": 1024 * MiB / 1e6 / sha256_speed,
            "load_average_at_end": os.getloadavg(),
        },
        "runs": runs,
        "summary": {
            "mb_per_s_median": medians,
            "ratio_median": medians["fetch_to_file"] / medians["curl"],
            "ratio_per_repetition": [by_rep["fetch_to_file", n] / by_rep["curl", n]
                                     for n in range(1, repetitions + 1)],
            "ratio_sha256_median": (medians["fetch_to_file_sha256"]
                                    / medians["curl_then_sha256"]),
            "cpu_s_per_gib_median": {
                tool: statistics.median(r["cpu_s_per_gib"] for r in runs if r["tool"] == tool)
                for tool in TOOLS},
            "max_rss_growth_mib": max(r["rss_growth"] for r in runs
                                      if r["tool"] in OURS) / MiB,
            "goal_ratio": GOAL_RATIO, "goal_rss_growth_mib": GOAL_RSS_GROWTH_MIB,
        },
    }


def check(tool: str, run: dict[str, Any], size: int, expected: str) -> None:
    """Every download is the whole file; every digest reported or re-read is the source's."""
    if run["size"] != size:
        raise RuntimeError(f"{tool} downloaded {run['size']} bytes")
    for key in ("sha256_computed", "sha256_on_disk"):
        if run.get(key) is not None and run[key] != expected:
            raise RuntimeError(f"{tool}: {key} does not match the source")
    if tool in OURS and run["sha256_on_disk"] is None:
        raise RuntimeError(f"{tool}: the written file was not checked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB)
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary file goes (default: the temp directory)")
    parser.add_argument("--https", action="store_true",
                        help="serve over TLS (a throwaway certificate), as object stores do")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--certificate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ca-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fetch", help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sha256", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.certificate)
        return
    if args.fetch:
        print(json.dumps(fetch_once(args.fetch, args.directory, sha256=args.sha256,
                                    ca_file=args.ca_file)))
        return
    results = benchmark(args.size_mib, args.repetitions, args.workdir, args.https)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = "fetch_bench_https" if args.https else "fetch_bench"
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS_DIR / f"{name}.png")
    print_table(results)


if __name__ == "__main__":
    main()
