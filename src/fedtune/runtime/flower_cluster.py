"""A whole Flower deployment on this machine: a SuperLink and SuperNodes on 127.0.0.1.

For the deploy tests, the overhead benchmark and trying the Flower runtime out before
going to several machines. It starts exactly the commands README "Deploy across
machines" gives (``flower-superlink``, ``flower-supernode``, ``flwr run``, and per SuperNode
fedtune's ClientApp worker ``python -m fedtune.runtime.flower_worker``), each in its own
process with its log in the work folder, and kills every one of them on `close`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from . import free_port

FLOWER_APP = Path(__file__).resolve().parents[3] / "deploy" / "flower"
"""The Flower app folder (``flwr run`` builds its FAB from it)."""


def flower_bin(name: str) -> str:
    """Path of a Flower console script, next to this Python first (a venv need not be activated)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (it comes with the flwr package: pip install flwr)")
    return found


def descendants(pid: int) -> list[int]:
    """Ids of the processes below `pid` (children first found, deepest last), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalFederation:
    """SuperLink + SuperNodes as child processes, with a Flower home (``FLWR_HOME``) of their own.

    Args:
        work: Folder for logs, the Flower home and certificates.
        tls: ``(ca_cert, server_cert, server_key)`` PEM paths for TLS, or None for ``--insecure``.
        node_auth: Start the SuperLink with ``--enable-supernode-auth``.
        env: More environment variables for every process (e.g. the split service's ``FEDTUNE_SPLIT_*``
            credentials, which the ServerApp and ClientApp processes inherit).
    """

    def __init__(self, work: Path, tls: tuple[Path, Path, Path] | None = None, node_auth: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.node_auth = node_auth
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        home = self.work / "flwr-home"
        home.mkdir(exist_ok=True)
        conn = [f'address = "{self.address}"']
        conn.append(f'root-certificates = "{tls[0]}"' if tls else "insecure = true")
        (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\n' + "\n".join(conn)
                                          + "\n")
        src = str(Path(__file__).resolve().parents[2])
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p), **(env or {})}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "w") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self, timeout: float = 60) -> None:
        args = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            ca, cert, key = self.tls
            args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        else:
            args.append("--insecure")
        if self.node_auth:
            args.append("--enable-supernode-auth")
        self._start("superlink", args)
        self.wait_for(lambda: "Uvicorn running" in self.log("superlink") or "startup complete" in
                      self.log("superlink"), timeout, "the SuperLink to start", "superlink")

    def start_supernode(self, name: str, node_config: str, private_key: Path | None = None,
                        isolation: str = "process") -> subprocess.Popen:
        """A SuperNode; with ``isolation="process"`` (the default) also its long-lived ClientApp worker
        (`fedtune.runtime.flower_worker`, log ``<name>.worker.log``), which keeps the model loaded between
        messages. ``"subprocess"`` is Flower's default: a new ClientApp process per message."""
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation={isolation!r}: use 'process' (fedtune's worker) or 'subprocess' (Flower's)")
        runtime_port = free_port()
        args = [flower_bin("flower-supernode"), "--superlink", self.address, "--port", str(runtime_port),
                "--node-config", node_config, "--max-retries", "3", "--isolation", isolation]
        args += ["--root-certificates", str(self.tls[0])] if self.tls else ["--insecure"]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        node = self._start(name, args)
        if isolation == "process":
            self._start(f"{name}.worker", [sys.executable, "-m", "fedtune.runtime.flower_worker",
                                           "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure"])
        return node

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (its connection is the default in the Flower home)."""
        return subprocess.run([flower_bin("flwr"), *args], env=self.env, cwd=self.work, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        out = self.flwr("supernode", "register", str(public_key), "local")
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed:\n{out.stdout}\n{out.stderr}")

    def submit(self, run_config: dict[str, object], app: Path = FLOWER_APP) -> int:
        """Start a fedtune run (``flwr run``) and return its Flower run id without waiting for it."""
        items = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in run_config.items())
        out = self.flwr("run", str(app), "local", "--run-config", items, "--format", "json")
        try:
            return int(json.loads(out.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr run failed:\n{out.stdout}\n{out.stderr}") from None

    def wait_for(self, done, timeout: float, what: str, log: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                tail = self.log(log)[-3000:] if log else ""
                raise TimeoutError(f"waited {timeout:g} s for {what}\n{tail}")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        """Kill one process we started and every process it started (Flower detaches some into new sessions);
        a SuperNode goes with its worker, as when its machine dies."""
        if not name.endswith(".worker"):
            self.kill(f"{name}.worker")
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:  # its process group (its own session): children left behind when it died on its own
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def kill_serverapp(self) -> int:
        """SIGKILL the ServerApp processes the SuperLink started (a server machine dying); returns how many."""
        killed = 0
        for pid in descendants(self.procs["superlink"].pid):
            try:
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            except OSError:  # includes ProcessLookupError: it ended meanwhile
                pass
        return killed

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
