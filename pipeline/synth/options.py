"""Options of the synthetic study generator."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.errors import PipelineError

COMPRESSIONS = (None, "rle", "jpeg2000")
#: Options added after studies had been generated and used (see :meth:`SynthOptions.fingerprint`).
LATER_OPTIONS = ("diameter_range_mm",)


class SynthOptionsError(PipelineError):
    """The generator options are inconsistent."""


@dataclass
class SynthOptions:
    """What kind of study to synthesise.

    Attributes
    ----------
    motion:
        "breathing" (tumour and diaphragm move; PET is the time average; IGTV > GTV) or
        "static" (no motion; GTV == IGTV; for pre-training).
    small:
        Reduced-size study for unit tests (CT 128x128, PET 64x64; well under 2 s).
    amplitude_mm:
        Tumour superior-inferior amplitude override (mm, 0-40); None draws it per lobe (0-25).
    amplitude_range_mm:
        (low, high) SI amplitude range (mm) drawn uniformly for every lobe; None uses the
        lobe's typical range (upper 0-8, middle 3-14, lower 8-25 mm).
    diameter_mm:
        Tumour equivalent diameter override (mm); None draws 5-60 mm (18-45 mm in ``small``).
    diameter_range_mm:
        (low, high) equivalent diameter range (mm), drawn log-uniformly for every tumour
        (e.g. small nodules for training); None uses the default draw.
    n_lesions:
        Number of lung tumours (all belong to the GTV/IGTV truth).
    lymph_nodes:
        Add 0-3 mediastinal/hilar lymph nodes, some FDG-avid (distractors, not in the truth).
    necrosis:
        Force (True) or forbid (False) a necrotic core; None draws it (large tumours only).
    feet_first:
        Patient position FFS instead of HFS (flipped x and slice direction).
    compress:
        None (explicit VR little endian), "rle" (RLE Lossless) or "jpeg2000" (JPEG 2000 lossless)
        for the CT and PET pixel data.
    pet_offset_mm:
        Rigid translation (x, y, z mm) added to the PET geometry: a point at p in the CT frame
        appears at p + offset in the PET's coordinates. Non-zero gives the PET its own
        FrameOfReferenceUID (registration must recover the offset).
    pet_slice_mm, ct_slice_mm:
        Override the slice spacing (PET 2-4 mm, CT 2-3 mm are drawn otherwise).
    pet_phases:
        Breathing phases averaged into the PET.
    """

    motion: str = "breathing"
    small: bool = False
    amplitude_mm: float | None = None
    amplitude_range_mm: tuple[float, float] | None = None
    diameter_mm: float | None = None
    diameter_range_mm: tuple[float, float] | None = None
    n_lesions: int = 1
    lymph_nodes: bool = True
    necrosis: bool | None = None
    feet_first: bool = False
    compress: str | None = None
    pet_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pet_slice_mm: float | None = None
    ct_slice_mm: float | None = None
    pet_phases: int = 10

    def validate(self) -> SynthOptions:
        """Raise :class:`SynthOptionsError` for impossible settings; return self."""
        if self.motion not in ("breathing", "static"):
            raise SynthOptionsError(f"motion must be 'breathing' or 'static', not {self.motion!r}")
        if self.compress not in COMPRESSIONS:
            raise SynthOptionsError(f"compress must be one of {COMPRESSIONS}, not {self.compress!r}")
        if self.amplitude_mm is not None and not 0 <= self.amplitude_mm <= 40:
            raise SynthOptionsError(f"amplitude_mm {self.amplitude_mm} outside 0-40 mm")
        if self.amplitude_range_mm is not None:
            lo, hi = self.amplitude_range_mm
            if not 0 <= lo <= hi <= 40:
                raise SynthOptionsError(f"amplitude_range_mm {self.amplitude_range_mm} must satisfy 0 <= low <= high <= 40")
        if self.diameter_mm is not None and not 3 <= self.diameter_mm <= 80:
            raise SynthOptionsError(f"diameter_mm {self.diameter_mm} outside 3-80 mm")
        if self.diameter_range_mm is not None:
            lo, hi = self.diameter_range_mm
            if not 3 <= lo <= hi <= 80:
                raise SynthOptionsError(f"diameter_range_mm {self.diameter_range_mm} must satisfy 3 <= low <= high <= 80")
            if self.diameter_mm is not None:
                raise SynthOptionsError("give diameter_mm or diameter_range_mm, not both")
        if not 1 <= self.n_lesions <= 5:
            raise SynthOptionsError(f"n_lesions {self.n_lesions} outside 1-5")
        if len(tuple(self.pet_offset_mm)) != 3:
            raise SynthOptionsError("pet_offset_mm needs three values (x, y, z)")
        for name in ("pet_slice_mm", "ct_slice_mm"):
            v = getattr(self, name)
            if v is not None and not 0.5 <= v <= 10:
                raise SynthOptionsError(f"{name} {v} outside 0.5-10 mm")
        if not 1 <= self.pet_phases <= 64:
            raise SynthOptionsError(f"pet_phases {self.pet_phases} outside 1-64")
        return self

    def fingerprint(self) -> str:
        """Stable text of the options, mixed into UIDs so different studies never share UIDs.

        Options in :data:`LATER_OPTIONS` are left out while unset, so a seed's studies keep the
        UIDs they had before those options existed (training splits are drawn from sorted UIDs).
        """
        d = {k: v for k, v in asdict(self).items() if not (k in LATER_OPTIONS and v is None)}
        d["pet_offset_mm"] = [float(v) for v in self.pet_offset_mm]
        return repr(sorted(d.items()))

    def as_dict(self) -> dict:
        """JSON-friendly copy."""
        d = asdict(self)
        d["pet_offset_mm"] = [float(v) for v in self.pet_offset_mm]
        return d
