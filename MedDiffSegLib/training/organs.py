"""Organ entries for training configs: a few well-known organs may be given by name alone.

A model package needs, per organ, a display name, a colour and SNOMED CT category/type codes
(they go into DICOM-SEG). A training config may list an organ as a full entry (a dict, see
:class:`~MedDiffSegLib.registry.Organ`) or, for the organs below, as just its name.
Any other organ must be given as a full entry: guessing a code would put wrong terminology
into clinical exports.
"""

from __future__ import annotations

from ..errors import ModelError
from ..registry import Organ

_ANATOMY = {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}

#: name -> (display name, colour, SNOMED CT type code[, the code's meaning when it is not the display name])
KNOWN_ORGANS: dict[str, tuple] = {
    "liver": ("Liver", (221, 130, 101), "10200004"),
    "spleen": ("Spleen", (157, 108, 162), "78961009"),
    "kidney_right": ("Right kidney", (185, 102, 83), "9846003"),
    "kidney_left": ("Left kidney", (185, 102, 83), "18639004"),
    "pancreas": ("Pancreas", (249, 180, 111), "15776009"),
    "stomach": ("Stomach", (216, 132, 105), "69695003"),
    "gallbladder": ("Gallbladder", (139, 150, 98), "28231008"),
    "aorta": ("Aorta", (224, 97, 76), "15825003"),
    "heart": ("Heart", (206, 110, 84), "80891009"),
    "esophagus": ("Esophagus", (211, 171, 143), "32849002"),
    "urinary_bladder": ("Urinary bladder", (222, 154, 132), "89837001"),
    "inferior_vena_cava": ("Inferior vena cava", (0, 151, 206), "64131007"),
    # BTCV and TotalSegmentator label both veins as one structure; SNOMED CT has no code for the
    # pair, so the type is the portal vein's (the code meaning says so, the display name says both).
    "portal_vein_and_splenic_vein": ("Portal vein and splenic vein", (0, 112, 165), "32764006", "Portal vein"),
    # SNOMED CT's adrenal gland; the side is in the display name (no lateralised code is guessed).
    "adrenal_gland_right": ("Right adrenal gland", (249, 186, 150), "23451007", "Adrenal gland"),
    "adrenal_gland_left": ("Left adrenal gland", (249, 186, 150), "23451007", "Adrenal gland"),
}


def organ_from_config(entry) -> Organ:
    """A config ``organs`` item (a full dict, or the name of a :data:`KNOWN_ORGANS` organ) → :class:`Organ`."""
    if isinstance(entry, dict):
        return Organ.from_dict(entry)
    if isinstance(entry, str):
        key = entry.strip()
        if key in KNOWN_ORGANS:
            display, colour, code, *meaning = KNOWN_ORGANS[key]
            return Organ(key, display, colour, dict(_ANATOMY),
                         {"code": code, "scheme": "SCT", "meaning": meaning[0] if meaning else display})
        raise ModelError(
            f"organ {entry!r} is not one of the organs that may be given by name alone "
            f"({', '.join(KNOWN_ORGANS)}); give it as a full entry: "
            '{"name": ..., "display_name": ..., "color": [r, g, b], '
            '"category": {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}, '
            '"type": {"code": <SNOMED CT code>, "scheme": "SCT", "meaning": ...}}'
        )
    raise ModelError(f"an organ must be a name or an object, got {entry!r}")
