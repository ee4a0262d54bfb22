"""Trim the bitsandbytes wheel to the native libraries a CUDA 12.8+ / 13 machine can load.

    python3 scripts/trim_wheel.py WHEEL [--min-cuda 128]

The wheel carries a library per CUDA, ROCm and XPU release (libbitsandbytes_cuda118.so ...
_rocm72.so, _xpu2026.so) and loads one: for a CUDA build of torch, the exact CUDA version or
else the nearest packaged one of the same major (bitsandbytes/cextension.py,
get_cuda_bnb_library_path); ROCm and XPU libraries only under those builds of torch. The GPU
check carries its wheels into a machine with a 64 MiB limit, so the rest goes: every ROCm and
XPU library and every CUDA library older than --min-cuda (as digits: 128 = CUDA 12.8), with
their RECORD lines. The CPU library stays. Every kept file is unchanged, so its RECORD hash holds.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import zipfile
from pathlib import Path

LIBRARY = re.compile(r"(?:^|/)libbitsandbytes_(?P<kind>[a-z]+)(?P<version>\d*)\.so$")


def keeps(name: str, min_cuda: int = 128) -> bool:
    """Whether a file of the wheel stays: anything but a bitsandbytes native library, the CPU one, and CUDA ones
    of version `min_cuda` or newer."""
    match = LIBRARY.search(name)
    if match is None:
        return True
    kind, version = match["kind"], match["version"]
    return kind == "cpu" or (kind == "cuda" and version != "" and int(version) >= min_cuda)


def trimmed_record(record: bytes, dropped: set[str]) -> bytes:
    """RECORD (CSV: path, hash, size) without the rows of the dropped files."""
    rows = [row for row in csv.reader(io.StringIO(record.decode())) if row and row[0] not in dropped]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def trim_wheel(path: Path, min_cuda: int = 128) -> list[str]:
    """Rewrite the wheel at `path` without the libraries `keeps` rejects; the names dropped."""
    with zipfile.ZipFile(path) as wheel:
        entries = wheel.infolist()
        dropped = {entry.filename for entry in entries if not keeps(entry.filename, min_cuda)}
        if not dropped:
            return []
        partial = path.with_name(path.name + ".partial")
        with zipfile.ZipFile(partial, "w") as out:
            for entry in entries:
                if entry.filename in dropped:
                    continue
                content = wheel.read(entry)
                if entry.filename.endswith(".dist-info/RECORD"):
                    content = trimmed_record(content, dropped)
                out.writestr(entry, content)  # the entry's own compression and metadata
    os.replace(partial, path)  # the wheel is whole or untouched, never half written
    return sorted(dropped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--min-cuda", type=int, default=128, help="oldest CUDA library kept, as digits (128 = 12.8)")
    args = parser.parse_args()
    before = args.wheel.stat().st_size
    dropped = trim_wheel(args.wheel, args.min_cuda)
    print(f"{args.wheel.name}: {before / 2**20:.1f} MiB -> {args.wheel.stat().st_size / 2**20:.1f} MiB, "
          f"dropped {len(dropped)}: {', '.join(Path(name).name for name in dropped) or 'nothing'}")


if __name__ == "__main__":
    main()
