"""Fuzz properties of the parsers that see network input: ingest (header), the pipeline reader, STOW multipart.

Each property takes generated input and fails only on a real robustness bug; ``test_fuzz.py`` runs
them with a small budget, ``benchmarks/fuzz_long.py`` with a large one.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid


def seed_instance(implicit: bool = False) -> bytes:
    """A small valid CT instance with a sequence and pixel data: the seed the mutations start from."""
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "P1", "A^B"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "123", "DCM"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.Rows, ds.Columns = [1, 1], 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(32)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


SEEDS = [seed_instance(False), seed_instance(True)]


@st.composite
def mutated_instances(draw) -> bytes:
    """A seed instance with random byte flips, a truncation, an insertion, or a length field blown up."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    kind = draw(st.sampled_from(["none", "truncate", "insert", "length"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    elif kind == "length" and len(data) > 140:
        i = draw(st.integers(132, len(data) - 4))
        data[i:i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\xf0\xff\xff\x7f", b"\xff\xff\x00\x00"]))
    return bytes(data)


class IngestTarget:
    """An Ingest over a throwaway data dir; :meth:`check` is the property."""

    def __init__(self) -> None:
        from pacs_node.index import Index
        from pacs_node.ingest import Ingest
        from pacs_node.spool import Spool

        self.root = Path(tempfile.mkdtemp(prefix="igtv-fuzz-"))
        self.spool = Spool(self.root / "data", min_free_mb=0)
        self.index = Index(self.root / "data" / "index.sqlite")
        self.ingest = Ingest(self.spool, self.index, 1 << 20, 100000)

    def check(self, blob: bytes) -> None:
        """Stored (under the spool, indexed) or refused with IngestRejected; nothing else."""
        from pacs_node.ingest import IngestRejected

        try:
            res = self.ingest.store(blob, source="fuzz")
        except IngestRejected as exc:
            assert 0 < exc.status <= 0xFFFF and not 0xA700 <= exc.status <= 0xA7FF, hex(exc.status)
            return
        row = self.index.instance(res.sop_uid)
        assert row is not None
        assert Path(row["path"]).resolve().is_relative_to(self.spool.root.resolve())

    def close(self) -> None:
        import shutil

        self.index.close()
        shutil.rmtree(self.root, ignore_errors=True)


def check_reader(blob: bytes) -> None:
    """pipeline.reader.scan_files reports an unreadable file; it never raises."""
    from pipeline.reader import scan_files

    with tempfile.TemporaryDirectory(prefix="igtv-fuzz-") as d:
        p = Path(d) / "x.dcm"
        p.write_bytes(blob)
        result = scan_files([p])
        n = sum(len(s.files) for s in result.series)
        assert n + len(result.unreadable) <= 1


boundaries = st.text(alphabet="abcXYZ019'()+_,-./:=? ", min_size=0, max_size=80)


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    """A well-formed body with random damage, or random bytes, and a random or matching boundary."""
    from pacs_node.multipart import encode_related

    parts = draw(st.lists(st.binary(max_size=40), min_size=0, max_size=3))
    body, ctype = encode_related(parts or [b""], boundary="bnd")
    body = bytearray(body)
    for _ in range(draw(st.integers(0, 4))):
        if body:
            i = draw(st.integers(0, len(body) - 1))
            body[i:i + draw(st.integers(0, 6))] = draw(st.binary(max_size=6))
    if draw(st.booleans()):
        ctype = f'multipart/related; type="application/dicom"; boundary={draw(boundaries)}'
    return bytes(body), ctype


def check_multipart(body: bytes, ctype: str) -> None:
    """parse_related returns parts whose content lies within the body, or raises MultipartError."""
    from pacs_node.multipart import MultipartError, parse_related

    try:
        _, parts = parse_related(body, ctype)
    except MultipartError:
        return
    assert parts
    assert sum(len(p.content) for p in parts) <= len(body)
