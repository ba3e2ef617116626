"""Reading an AMD kernel's AMDGCN (gfx942): registers, spills, LDS, global access widths, matrix-core (MFMA)
instructions. No time model for AMD yet: the report shows what the compiler made."""

from __future__ import annotations

import re
from collections import Counter

_META = re.compile(r"^\s+\.(vgpr_count|sgpr_count|vgpr_spill_count|sgpr_spill_count|group_segment_fixed_size):\s+(\d+)",
                   re.M)
_ACCESS = re.compile(r"^\s+(global|buffer)_(load|store)_(\w+)", re.M)
_BITS = {"dwordx4": 128, "dwordx3": 96, "dwordx2": 64, "dword": 32, "short": 16, "ushort": 16, "sshort": 16,
         "byte": 8, "ubyte": 8, "sbyte": 8, "short_d16": 16, "short_d16_hi": 16, "b128": 128, "b96": 96,
         "b64": 64, "b32": 32, "b16": 16, "u16": 16, "i16": 16, "u8": 8, "i8": 8}


def read(amdgcn: str) -> dict:
    """``{"vgprs", "sgprs", "spills", "lds", "load_widths", "store_widths", "mfma"}`` of one kernel's assembly."""
    meta = {k: int(v) for k, v in _META.findall(amdgcn)}
    widths = {"load": Counter(), "store": Counter()}
    for _, kind, suffix in _ACCESS.findall(amdgcn):
        widths[kind][_BITS.get(suffix, 0)] += 1
    mfma = len(re.findall(r"^\s+v_mfma\w*", amdgcn, re.M))
    return {"vgprs": meta.get("vgpr_count", 0), "sgprs": meta.get("sgpr_count", 0),
            "spills": meta.get("vgpr_spill_count", 0) + meta.get("sgpr_spill_count", 0),
            "lds": meta.get("group_segment_fixed_size", 0), "load_widths": dict(widths["load"]),
            "store_widths": dict(widths["store"]), "mfma": mfma}
