"""What the Flower runtime costs over the local runtime, on the same tiny experiment.

    PYTHONPATH=src python benchmarks/flower_overhead.py [--rounds 3] [--clients 2] [--set peft.r=64 ...]
        [--isolation process|subprocess]

``--isolation process`` (the default): each SuperNode's ClientApp tasks run in one long-lived
`fedtune.runtime.flower_worker` process; ``subprocess``: Flower's default, a new ClientApp process per message.

Round time: the time between consecutive server checkpoints (one whole round: sending, client
training, aggregation, evaluation, saving), watched from this process for both runtimes, so the
same clock and the same definition apply to both. The first round is reported apart: it also
pays for loading; the ratio uses the later rounds.

Bytes on the wire: the SuperNodes reach the SuperLink through a counting TCP proxy (plain HTTP,
no TLS, so nothing but Flower's own framing is added), compared with the fedtune payload bytes the
run counted itself (``bytes_up + bytes_down`` of every client record, which are `wire.encoded_size`).
The wire count includes everything a SuperNode exchanges during the run: the startup query,
heartbeats, polling for messages and fetching the app bundle.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedtune import config as cfg
from fedtune import experiment
from fedtune.checkpoint import FILE as CHECKPOINT
from fedtune.runtime import free_port
from fedtune.runtime.flower_cluster import LocalFederation
from fedtune.wire import decode

TINY = ["model.name=tiny-llama", "data.demo_train_size=80", "data.demo_test_size=16", "train.local_steps=2",
        "train.batch_size=4", "train.lr=0.01", "train.count_flops=false", "eval.max_examples=16", "eval.base=false"]


class CountingProxy:
    """Forwards TCP connections from a local port to `upstream`, counting the bytes each way."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.up = self.down = 0  # up: SuperNode -> SuperLink
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", free_port()))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # the SuperLink is gone (the federation is closing): drop this connection
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> None:
        with self.lock:
            self.up = self.down = 0


def watch_rounds(run: Path, stop: threading.Event) -> list[float]:
    """Times (monotonic) at which the checkpoint reached round 1, 2, ... (filled in by a thread)."""
    times: list[float] = []

    def poll() -> None:
        seen = 0
        while not stop.is_set():
            path = run / CHECKPOINT
            try:
                rnd = int(decode(path.read_bytes()).meta["round"]) if path.exists() else 0
            except (OSError, ValueError, KeyError):  # caught mid-replace: try again
                rnd = seen
            while seen < rnd:
                times.append(time.monotonic())
                seen += 1
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return times


def round_times(start: float, times: list[float]) -> list[float]:
    return [t - p for p, t in zip([start, *times], times)]


def payload_bytes(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rows if r["type"] == "client")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. peft.r=64")
    p.add_argument("--isolation", choices=["process", "subprocess"], default="process",
                   help="process: fedtune's long-lived ClientApp worker per SuperNode; subprocess: Flower's default")
    a = p.parse_args()
    c = cfg.load(None, TINY + [f"federation.rounds={a.rounds}", f"federation.num_clients={a.clients}",
                               f"federation.clients_per_round={a.clients}", "name=flower-overhead", *a.set])
    work = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    (work / "exp.yaml").write_text(cfg.to_yaml(c))

    stop = threading.Event()
    start = time.monotonic()
    times = watch_rounds(work / "local", stop)
    experiment.run(c, work / "local", quiet=True)
    time.sleep(0.1)
    local = round_times(start, times)

    with LocalFederation(work / "flower-work") as fed:
        fed.start_superlink()
        proxy = CountingProxy(("127.0.0.1", fed.port))
        fed.address = proxy.address  # the SuperNodes dial the proxy
        for i in range(a.clients):
            fed.start_supernode(f"node{i}", f"partition-id={i} num-partitions={a.clients}", isolation=a.isolation)
        time.sleep(5)  # connected and idle: what follows is the run's traffic
        proxy.reset()
        run = work / "flower"
        start = time.monotonic()
        times = watch_rounds(run, stop)
        fed.submit({"config": str(work / "exp.yaml"), "out": str(run)})
        fed.wait_for(lambda: (run / "summary.json").exists(), 1800, "the Flower run", "superlink")
        flower = round_times(start, times)
        wire_up, wire_down = proxy.up, proxy.down
    stop.set()

    counted = payload_bytes(run)
    later = lambda xs: sum(xs[1:]) / max(1, len(xs) - 1)
    result = {
        "config": {"rounds": a.rounds, "clients": a.clients, "overrides": a.set, "isolation": a.isolation},
        "local_round_s": [round(x, 2) for x in local],
        "flower_round_s": [round(x, 2) for x in flower],
        "round_time_ratio_after_round_1": round(later(flower) / later(local), 1),
        "payload_bytes_counted": counted,
        "wire_bytes_up": wire_up,
        "wire_bytes_down": wire_down,
        "wire_over_payload": round((wire_up + wire_down) / counted, 3),
        "framing_overhead_bytes": wire_up + wire_down - counted,
    }
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
