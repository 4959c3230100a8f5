"""Fixtures for the DICOM tests: the real series, organs, dciodvfy, dcmqi and a real Orthanc PACS.

Tools come from ``.ci/install.d/20-dicom.sh`` (Debian's dicom3tools and orthanc, PyPI's dcmqi);
tests that need one that is missing are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from MedDiffSegLib.registry.package import Organ

SCT = "SCT"
ANATOMY = {"code": "123037004", "scheme": SCT, "meaning": "Anatomical Structure"}
LIVER = Organ("liver", "Liver", (221, 130, 101), ANATOMY, {"code": "10200004", "scheme": SCT, "meaning": "Liver"})
SPINE = Organ("spine", "Spine", (241, 214, 145), ANATOMY,
              {"code": "421060004", "scheme": SCT, "meaning": "Vertebral column"})
HEART = Organ("heart", "Heart", (206, 110, 84), ANATOMY, {"code": "80891009", "scheme": SCT, "meaning": "Heart"})
SPLEEN = Organ("spleen", "Spleen", (157, 108, 162), ANATOMY, {"code": "78961009", "scheme": SCT, "meaning": "Spleen"})
KIDNEY_R = Organ("kidney_right", "Right kidney", (185, 102, 83), ANATOMY,
                 {"code": "9846003", "scheme": SCT, "meaning": "Right kidney"})


def find_tool(name: str) -> str | None:
    """A tool on PATH, in the venv's bin (dcmqi's scripts), or in /usr/sbin (Debian puts Orthanc there)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (Path(sys.executable).parent, Path("/usr/sbin"), Path("/usr/local/sbin")):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(scope="session")
def ct20(data_dir) -> Path:
    """The 20-slice CT (JPEG 2000; empty SOP/Study/Series Instance UIDs in the data sets)."""
    return data_dir / "totalsegmentator" / "example_ct_dicom"


@pytest.fixture(scope="session")
def ct3(data_dir) -> Path:
    """The 3-slice CT of dcmqi's test data (labels in liver_spine_seg.nrrd, SEG in liver.dcm)."""
    path = data_dir / "dcmqi" / "ct-3slice"
    if not path.is_dir():
        pytest.skip(f"dcmqi test data not found at {path}")
    return path


# -- dciodvfy ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dciodvfy():
    """``check(path) -> warnings``: runs dciodvfy and fails the test on any "Error" line."""
    tool = find_tool("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; .ci/install.d/20-dicom.sh installs it)")

    def check(path) -> list[str]:
        proc = subprocess.run([tool, str(path)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("Error")]
        assert not errors, f"dciodvfy found errors in {path}:\n" + "\n".join(lines)
        return [ln for ln in lines if ln.startswith("Warning")]

    return check


@pytest.fixture(scope="session")
def segimage2itkimage() -> str:
    tool = find_tool("segimage2itkimage")
    if tool is None:
        pytest.skip("segimage2itkimage not installed (PyPI package dcmqi; .ci/install.d/20-dicom.sh installs it)")
    return tool


# -- Orthanc ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """An Orthanc on localhost with its own storage, index and configuration in a temp folder."""

    AET = "MDSTESTPACS"

    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.dicom_port = 0
        self.http_port = 0
        self.log = root / "orthanc.log"

    def start(self, attempts: int = 3) -> None:
        last = ""
        for _ in range(attempts):
            self.dicom_port, self.http_port = free_port(), free_port()
            config = {
                "Name": "MedDiffSegTestPACS",
                "StorageDirectory": str(self.root / "storage"),
                "IndexDirectory": str(self.root / "index"),
                "DicomServerEnabled": True,
                "DicomAet": self.AET,
                "DicomPort": self.dicom_port,
                "DicomCheckCalledAet": True,  # a wrong called AE title is rejected (tested)
                "DicomAlwaysAllowStore": True,  # unknown callers may C-STORE
                "DicomCheckModalityHost": False,
                "DicomModalities": {},
                "HttpServerEnabled": True,
                "HttpPort": self.http_port,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "Plugins": [],
                "SaveJobs": False,
                "ConcurrentJobs": 1,
                "DicomThreadsCount": 2,
                "HttpThreadsCount": 4,
                "StorageCompression": False,
            }
            cfg = self.root / "orthanc.json"
            cfg.write_text(json.dumps(config, indent=2))
            log = open(self.log, "ab")
            self.proc = subprocess.Popen([self.binary, f"--logfile={self.log}", str(cfg)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.get("/system")
                    return
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.2)
            last = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop()
        raise RuntimeError(f"Orthanc did not start; log tail:\n{last}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read().decode("utf-8"))

    def post(self, path: str, body: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body.encode("utf-8"), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read().decode("utf-8"))

    def instance_tags(self, sop_instance_uid: str) -> dict | None:
        """Simplified tags of the stored instance with this SOP Instance UID, or None."""
        found = [x for x in self.post("/tools/lookup", sop_instance_uid) if x.get("Type") == "Instance"]
        if not found:
            return None
        return self.get(f"/instances/{found[0]['ID']}/simplified-tags")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary = find_tool("Orthanc")
    if binary is None:
        pytest.skip("Orthanc not installed (Debian package orthanc; .ci/install.d/20-dicom.sh installs it)")
    server = OrthancServer(binary, tmp_path_factory.mktemp("orthanc"))
    try:
        server.start()
        yield server
    finally:
        server.stop()  # always: also when start() or a test failed
