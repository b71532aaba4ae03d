"""Test helpers for pacs_node: tiny PET/CT studies, a fake processing function, free ports, waits."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from pipeline.uids import derive_uid
from tests.system_tools import dcmtk

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PET_CLASS = "1.2.840.10008.5.1.4.1.1.128"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _image(sop_class: str, modality: str, study_uid: str, series_uid: str, for_uid: str, z: float, n: int,
           rows: int, series_number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = n + 1
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST123"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "igtv-test"
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 3.0
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if modality == "CT" else 0
    rng = np.random.default_rng(n)
    dtype = np.int16 if modality == "CT" else np.uint16
    ds.PixelData = rng.integers(0, 1000, size=(rows, rows)).astype(dtype).tobytes()
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
    else:
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.Units = "BQML"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.CorrectedImage = ["ATTN", "DECY"]
    return ds


@dataclass
class TinyStudy:
    """A written tiny PET/CT study."""

    root: Path
    study_uid: str
    ct_files: list[Path] = field(default_factory=list)
    pet_files: list[Path] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [*self.ct_files, *self.pet_files]


def make_study(root: Path, n_ct: int = 6, n_pet: int = 4, rows: int = 32, rle_ct: bool = False,
               study_uid: str | None = None) -> TinyStudy:
    """Write a tiny PET/CT study (CT optionally RLE-compressed) under ``root``."""
    study_uid = study_uid or generate_uid()
    study = TinyStudy(root=root, study_uid=study_uid)
    for_uid = generate_uid()
    ct_series, pet_series = generate_uid(), generate_uid()
    (root / "ct").mkdir(parents=True, exist_ok=True)
    (root / "pet").mkdir(parents=True, exist_ok=True)
    for i in range(n_ct):
        ds = _image(CT_CLASS, "CT", study_uid, ct_series, for_uid, 3.0 * i, i, rows, 2, "CT thorax")
        if rle_ct:
            ds.compress(RLELossless)
        path = root / "ct" / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.ct_files.append(path)
    for i in range(n_pet):
        ds = _image(PET_CLASS, "PT", study_uid, pet_series, for_uid, 4.5 * i, i, rows // 2, 3, "PET AC")
        path = root / "pet" / f"pt{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.pet_files.append(path)
    return study


def storescu(port: int, files: list[Path], aec: str = "IGTV", aet: str = "STORESCU",
             extra: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Send files with dcmtk storescu (proposing the transfer syntax of each file)."""
    cmd = [dcmtk("storescu"), "--required", "-aet", aet, "-aec", aec, "-to", "20", "-ta", "20", "-td", "20",
           *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, aec: str = "IGTV", aet: str = "ECHOSCU", extra: list[str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
    """C-ECHO with dcmtk echoscu."""
    cmd = [dcmtk("echoscu"), "-aet", aet, "-aec", aec, "-to", "10", "-ta", "10", "-td", "10",
           *(extra or []), "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def scu_store_status(port: int, path: Path, aet: str = "STORESCU", aec: str = "IGTV") -> int:
    """C-STORE one file with pynetdicom and return the status the node answered."""
    from pydicom import dcmread
    from pynetdicom import AE

    ds = dcmread(path)
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established, "association failed"
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


# -- a stand-in for pipeline.process.process_study -------------------------------------------


@dataclass
class FakeResult:
    """Has the attributes of pipeline's StudyResult that the worker reads."""

    study_instance_uid: str
    out_dir: Path
    outputs: list[Path]
    dicom_outputs: list[Path]
    report: dict
    found: list[str]
    skipped: list[tuple[str, str]]


def fake_process(paths: list[Path], out_dir: Path, settings) -> FakeResult:
    """Write a real (highdicom) SEG and a minimal RTSTRUCT on the CT of ``paths``; deterministic UIDs.

    Raises MissingPetError when no PET is among the inputs, like the real pipeline would.
    """
    import highdicom as hd
    from pydicom import dcmread

    from pipeline.errors import MissingCtError, MissingPetError

    datasets = [dcmread(p) for p in paths]
    by_series: dict[str, list[Dataset]] = {}
    for d in datasets:
        if d.Modality == "CT":
            by_series.setdefault(d.SeriesInstanceUID, []).append(d)
    largest = max(by_series.values(), key=len) if by_series else []
    ct = sorted(largest, key=lambda d: float(d.ImagePositionPatient[2]))
    pet = [d for d in datasets if d.Modality == "PT"]
    if not pet:
        raise MissingPetError("study holds no PET series; send the attenuation-corrected PET")
    if not ct:
        raise MissingCtError("study holds no CT series")
    for d in ct:
        d.decompress() if d.file_meta.TransferSyntaxUID.is_compressed else None
    study_uid = ct[0].StudyInstanceUID
    root = settings.uid_root
    mask = np.zeros((len(ct), ct[0].Rows, ct[0].Columns), dtype=bool)
    mask[:, 8:16, 8:16] = True
    algo = hd.AlgorithmIdentificationSequence(
        name="fake", version="0", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing"))
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="IGTV",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
    seg = hd.seg.Segmentation(
        source_images=ct, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        series_instance_uid=derive_uid(root, study_uid, "fake", "seg-series"), series_number=901,
        sop_instance_uid=derive_uid(root, study_uid, "fake", "seg"), instance_number=1,
        manufacturer="igtv-test", manufacturer_model_name="fake", software_versions="0",
        device_serial_number="0")
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = out_dir / "seg.dcm"
    seg.save_as(seg_path)
    rt_path = out_dir / "rtstruct.dcm"
    _minimal_rtstruct(ct, derive_uid(root, study_uid, "fake", "rt-series"),
                      derive_uid(root, study_uid, "fake", "rt")).save_as(rt_path, enforce_file_format=True)
    report_path = out_dir / "report.json"
    report = {"study": study_uid, "volume_cc": 1.0}
    report_path.write_text(str(report))
    return FakeResult(study_uid, out_dir, [seg_path, rt_path, report_path], [seg_path, rt_path], report,
                      [f"CT {len(ct)} slices", f"PT {len(pet)} slices"], [])


def _minimal_rtstruct(ct: list[Dataset], series_uid: str, sop_uid: str) -> Dataset:
    first = ct[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_CLASS, sop_uid
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, kw, getattr(first, kw))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "RTSTRUCT", series_uid, 902, 1
    ds.Manufacturer, ds.StructureSetLabel = "igtv-test", "IGTV"
    ds.StructureSetDate, ds.StructureSetTime = "20240101", "120000"
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_for])
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = 1, first.FrameOfReferenceUID, "IGTV"
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    ds.StructureSetROISequence = Sequence([roi])
    contours = []
    for d in ct:
        z = float(d.ImagePositionPatient[2])
        c = Dataset()
        img = Dataset()
        img.ReferencedSOPClassUID, img.ReferencedSOPInstanceUID = d.SOPClassUID, d.SOPInstanceUID
        c.ContourImageSequence = Sequence([img])
        c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", 4
        c.ContourData = [16, 16, z, 32, 16, z, 32, 32, z, 16, 32, z]
        contours.append(c)
    rc = Dataset()
    rc.ReferencedROINumber, rc.ROIDisplayColor, rc.ContourSequence = 1, [255, 0, 0], Sequence(contours)
    ds.ROIContourSequence = Sequence([rc])
    obs = Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType, obs.ROIInterpreter = 1, 1, "GTV", ""
    ds.RTROIObservationsSequence = Sequence([obs])
    return ds


# Stages and fractions that staged_process reports, and the timings its report gives.
STAGED = (("load", 0.0), ("inference", 0.5), ("writers", 0.75))
STAGED_TIMINGS = {"load": 0.11, "inference": 2.5, "writers": 0.31, "total": 2.92}


def staged_process(paths: list[Path], out_dir: Path, settings, progress=None) -> FakeResult:
    """Report the STAGED stages through ``progress``; hold in 'inference' until ``out_dir/go`` exists (30 s max)."""
    for stage, fraction in STAGED:
        progress(stage, fraction)
        time.sleep(0.05)
        deadline = time.monotonic() + 30
        while stage == "inference" and not (out_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"timings_s": dict(STAGED_TIMINGS)}
    return FakeResult(out_dir.name, out_dir, [], [], report, [f"{len(paths)} files"], [])


def failing_process(paths: list[Path], out_dir: Path, settings):
    """Always fails like the pipeline does on bad input."""
    from pipeline.errors import GeometryError

    raise GeometryError("CT series 'CT thorax': slice spacing varies (3.0 to 9.0 mm); resend a regular series")


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on loopback ``port``."""
    def _open() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(_open, timeout, what=f"port {port} to open")


class StoreScp:
    """A dcmtk storescp destination writing into ``out``."""

    def __init__(self, out: Path, aet: str = "DEST") -> None:
        self.out = out
        self.aet = aet
        self.port = free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", aet, "-od", str(out), "-uf", "-ta", "20", "-td", "20", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        wait_port(self.port)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Pki:
    """A throwaway CA with a server (127.0.0.1/localhost) and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path) -> Pki:
    """Generate the CA and certificates with the openssl CLI (EC P-256, 1 day)."""
    folder.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30, cwd=folder)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=igtv test CA", "-keyout", "ca.key", "-out", "ca.pem",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key")


def node_config(data_dir: Path, **overrides):
    """A NodeConfig for tests: loopback, free ports, fake processing, short stable age."""
    from pacs_node.config import NodeConfig

    cfg = NodeConfig()
    cfg.listener.host = "127.0.0.1"
    cfg.listener.port = 0
    cfg.listener.allow_aet = []
    cfg.http.host = "127.0.0.1"
    cfg.http.port = 0
    cfg.spool.data_dir = data_dir
    cfg.spool.stable_age_s = 1.0
    cfg.spool.min_free_mb = 0
    cfg.spool.journal_segment_mb = 2  # tiny test studies: small journal segments
    cfg.worker.process_function = "nodetest_helpers:fake_process"
    cfg.export.backoff_initial_s = 0.5
    cfg.export.timeout_s = 10
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value)
    return cfg
