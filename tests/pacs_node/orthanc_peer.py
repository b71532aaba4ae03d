"""A throwaway Orthanc PACS for tests: generated config, loopback free ports, DICOMweb plugin, Lua routing."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from nodetest_helpers import free_port, wait_for

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)

# Route a stable study's CT and PET series (never the node's own SEG/RTSTRUCT) to the node.
ROUTE_LUA = """
function OnStableStudy(studyId, tags, metadata)
  local study = ParseJson(RestApiGet('/studies/' .. studyId))
  local resources = {}
  for i, seriesId in pairs(study['Series']) do
    local series = ParseJson(RestApiGet('/series/' .. seriesId))
    local modality = series['MainDicomTags']['Modality']
    if modality == 'CT' or modality == 'PT' then
      table.insert(resources, seriesId)
    end
  end
  if #resources > 0 then
    RestApiPost('/modalities/igtv/store', DumpJson({Resources = resources, Asynchronous = true}, true))
  end
end
"""


def dicomweb_plugin() -> str:
    """Path of the orthanc-dicomweb plugin (from ``dpkg -L`` or the usual places)."""
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=10).stdout
        for line in listing.splitlines():
            if line.endswith(".so") or ".so." in line:
                if Path(line).is_file():
                    return line
    except (OSError, subprocess.SubprocessError):
        pass
    for cand in DICOMWEB_PLUGIN_CANDIDATES:
        if Path(cand).is_file():
            return cand
    raise FileNotFoundError("orthanc-dicomweb plugin not found; apt-get install orthanc-dicomweb")


class Orthanc:
    """Orthanc started with a generated configuration; ``stop()`` ends it."""

    def __init__(self, folder: Path, node_aet: str, node_port: int, stable_age: int = 1,
                 dicomweb_servers: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.aet = "ORTHANC"
        (folder / "route.lua").write_text(ROUTE_LUA)
        config = {
            "Name": "igtv-test-orthanc",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "StableAge": stable_age,
            "DicomModalities": {"igtv": [node_aet, "127.0.0.1", node_port]},
            "LuaScripts": [str(folder / "route.lua")],
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
            "HttpTimeout": 20,
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.folder = folder
        try:
            wait_for(self._up, 30, 0.2, what="Orthanc to answer /system")
        except AssertionError:
            self.stop()
            raise AssertionError("Orthanc did not start:\n" + (folder / "orthanc.log").read_text()[-3000:]) from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("Orthanc exited:\n" + (self.folder / "orthanc.log").read_text()[-3000:])
        try:
            self.get("/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": ctype} if body is not None else {})
        with urllib.request.urlopen(req, timeout=20) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, path: Path) -> dict:
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")

    def find_instance(self, sop_uid: str) -> str | None:
        hits = self.request("POST", "/tools/lookup", sop_uid.encode(), "text/plain")
        ids = [h["ID"] for h in hits if h.get("Type") == "Instance"]
        return ids[0] if ids else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
