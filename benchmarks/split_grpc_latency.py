"""Per-step latency of split learning's gRPC service on loopback, against a bare gRPC echo of the same size.

    PYTHONPATH=src python benchmarks/split_grpc_latency.py [--mb 1] [--steps 100]

What it measures, on 127.0.0.1 (plain TCP, token authentication):

* ``service``: one split step over `fedtune.runtime.split_service` as a client sees it: encode ``split_act``
  (activations of --mb MiB fp32, attention mask, labels), send it on the session's stream, the service decodes
  and validates it (`read_activations`: shapes, dtypes, finite values, label range) and replies ``split_grad``
  of the same size, which the client decodes and validates. The main server's own compute is left out (a stub
  returns the activations as the gradient), so the figure is the protocol's cost, not the model's.
* ``echo``: a bare gRPC bidirectional stream that sends the same number of bytes and gets them back.
  The steps cycle four sets of tensors as the echo cycles four payloads (the same cache exposure).
* bytes: what crossed the socket (a counting TCP relay between client and service) against what fedtune
  counts (the sum of the payloads' lengths): the difference is gRPC/HTTP2 framing and headers.

Prints medians over --steps steps (after 5 warm-up steps) and their ratio, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import threading
import time
from concurrent import futures

import grpc
import torch

from fedtune.data.tasks import IGNORE
from fedtune.split_session import Activations
from fedtune.runtime import split_auth as auth
from fedtune.runtime import split_client as remote
from fedtune.runtime import split_service as svc
from fedtune.wire import Message, encode

HIDDEN = 256
MAX_BYTES = 64 * 1024**2
_END = object()


class EchoMain:
    """A main server without compute: the gradient is a copy of the activations (isolates the protocol)."""

    class cut:  # what the service reads of a Cut
        layer, u_shaped = 1, False

    def forward_backward(self, activations, attention_mask, labels):
        return activations.clone(), 0.0

    def abandon(self):
        pass

    def take_compute(self):
        return 0, 0.0

    def state(self):
        return {}


class CountingRelay:
    """A TCP relay on 127.0.0.1 that forwards to `target` and counts the bytes in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
                setattr(self, direction, getattr(self, direction) + len(chunk))
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def act_tensors(mb: float) -> dict[str, torch.Tensor]:
    """A ``split_act``'s tensors: about `mb` MiB of fp32 activations, the attention mask, the labels."""
    seq = 256
    batch = max(1, round(mb * 1024**2 / (seq * HIDDEN * 4)))
    labels = torch.full((batch, seq), IGNORE, dtype=torch.int32)
    labels[:, -4:] = 7
    return {"activations": torch.randn(batch, seq, HIDDEN), "attention_mask": torch.ones(batch, seq, dtype=torch.bool),
            "labels": labels}


def act_message(tensors: dict[str, torch.Tensor], step: int, steps: int) -> Message:
    return Message(tensors, {"kind": "split_act", "round": 1, "step": step, "steps": steps,
                             "num_examples": len(tensors["labels"])})


class Echo:
    """A bare gRPC bidirectional stream that returns every payload as it came (raw bytes, no fedtune code)."""

    def __init__(self) -> None:
        handler = grpc.method_handlers_generic_handler("bench.Echo", {
            "Echo": grpc.stream_stream_rpc_method_handler(lambda requests, context: (r for r in requests))})
        options = [("grpc.max_send_message_length", MAX_BYTES), ("grpc.max_receive_message_length", MAX_BYTES)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handler], options=options)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.outbox: queue.Queue = queue.Queue()
        self.replies = self.channel.stream_stream("/bench.Echo/Echo")(iter(self.outbox.get, _END))

    def exchange(self, payload: bytes) -> bytes:
        self.outbox.put(payload)
        return next(self.replies)

    def close(self) -> None:
        self.outbox.put(_END)
        self.channel.close()
        self.server.stop(grace=None).wait(10)


def bench(mb: float, steps: int, warmup: int, *, relay: bool) -> dict:
    """One session of ``warmup + steps`` split steps; each timed step is followed by a timed echo of the
    same payload size, so both see the same machine load (this machine may be shared).

    With `relay`, the service is reached through the counting relay (for bytes; its copies distort timing).
    """
    tokens = {auth.node_identity(0): os.urandom(16).hex(), auth.FED_SERVER: os.urandom(16).hex()}
    service = svc.SplitService(EchoMain(), Activations(torch.float32, HIDDEN, 1000), tokens=tokens, mtls=False,
                               max_bytes=MAX_BYTES)
    server, port = svc.start_server(service, "127.0.0.1:0", auth.ServerSecurity(tokens=tokens))
    counter = CountingRelay(port) if relay else None
    address = f"127.0.0.1:{counter.port if relay else port}"
    fed = remote.RemoteMainServer(address, auth.Credentials(auth.FED_SERVER, token=tokens[auth.FED_SERVER]),
                               cut=EchoMain.cut, wire_dtype=torch.float32, expect={})
    echo = Echo()
    total = warmup + steps
    # Four sets of tensors in turn, as the echo cycles four payloads: both sides of the comparison read
    # buffers that have the same chance of being in the cache (a real client's activations are fresh too).
    pool = [act_tensors(mb) for _ in range(4)]
    messages = [act_message(pool[s % 4], s, total) for s in range(1, total + 1)]
    size = len(encode(messages[0]))
    payloads = [os.urandom(size) for _ in range(4)]
    step_times, echo_times = [], []
    try:
        key = fed.begin(1, 0)
        up0, down0 = (counter.up, counter.down) if relay else (0, 0)
        creds = auth.Credentials(auth.node_identity(0), token=tokens[auth.node_identity(0)])
        with remote.StepStream(address, creds, max_bytes=MAX_BYTES, session_key=key) as stream:
            for i, msg in enumerate(messages):
                shape = tuple(msg.tensors["activations"].shape)
                start = time.perf_counter()
                stream.exchange(msg, expect={"grad": (shape, torch.float32)})
                middle = time.perf_counter()
                assert len(echo.exchange(payloads[i % 4])) == size
                end = time.perf_counter()
                if i >= warmup:
                    step_times.append(middle - start)
                    echo_times.append(end - middle)
            counted_up, counted_down = stream.bytes_up, stream.bytes_down
        time.sleep(0.2)  # let the relay forward the stream's last frames
        # the stream's connection, its setup included
        wire_up, wire_down = (counter.up - up0, counter.down - down0) if relay else (None, None)
        report = fed.finish(1, 0)
    finally:
        fed.close()
        echo.close()
        server.stop(grace=None).wait(10)
        if relay:
            counter.close()
    # the service's count of the stream equals the client's
    assert report["stream_bytes_up"] == counted_up and report["stream_bytes_down"] == counted_down
    return {"step_ms": 1e3 * statistics.median(step_times), "echo_ms": 1e3 * statistics.median(echo_times),
            "payload_bytes": size, "counted_up": counted_up, "counted_down": counted_down, "wire_up": wire_up,
            "wire_down": wire_down}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=1.0, help="activations per step, MiB (default 1)")
    p.add_argument("--steps", type=int, default=100, help="timed steps (default 100)")
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    s = bench(args.mb, args.steps, args.warmup, relay=False)
    b = bench(args.mb, 10, 0, relay=True)  # bytes on the socket: a shorter session through the relay
    ratio = s["step_ms"] / s["echo_ms"]
    print(f"split step over the service: median {s['step_ms']:.2f} ms, {s['payload_bytes']} B up and about as "
          f"much down (median of {args.steps})")
    print(f"bare gRPC echo, same size:   median {s['echo_ms']:.2f} ms  ->  ratio {ratio:.2f}x")
    for d in ("up", "down"):
        extra = b[f"wire_{d}"] - b[f"counted_{d}"]
        print(f"bytes {d:>4} (10 steps): counted {b[f'counted_{d}']}, on the socket {b[f'wire_{d}']} "
              f"(+{extra}, {100 * extra / b[f'counted_{d}']:.3f}%: gRPC/HTTP2 framing and headers)")
    print(json.dumps({"mb": args.mb, "steps": args.steps, "ratio": ratio, **{k: s[k] for k in (
        "step_ms", "echo_ms", "payload_bytes")}, **{k: b[k] for k in ("counted_up", "counted_down", "wire_up",
                                                                      "wire_down")}}))


if __name__ == "__main__":
    main()
