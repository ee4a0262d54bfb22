"""scripts/trim_wheel.py: bitsandbytes' wheel without the libraries a CUDA 12.8+ machine never loads."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("trim_wheel", REPO / "scripts" / "trim_wheel.py")
trim_wheel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trim_wheel)

LIBRARIES = ("cpu", "cuda118", "cuda126", "cuda128", "cuda130", "cuda132", "rocm64", "rocm72", "xpu2025", "xpu2026")


def record_line(name: str, content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(content)}\n"


def synthetic_wheel(folder: Path) -> Path:
    """A wheel laid out like bitsandbytes' own: package files, one library per backend, a RECORD of them all."""
    files = {"bitsandbytes/__init__.py": b"__version__ = '0.0'\n",
             **{f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 1000 for lib in LIBRARIES},
             "bitsandbytes-0.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.0\n",
             "bitsandbytes-0.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"}
    record = "".join(record_line(name, content) for name, content in files.items())
    path = folder / "bitsandbytes-0.0-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)
        wheel.writestr("bitsandbytes-0.0.dist-info/RECORD", record + "bitsandbytes-0.0.dist-info/RECORD,,\n")
    return path


def test_trimmed_wheel_keeps_cpu_and_cuda_12_8_up_with_a_record_that_matches(tmp_path):
    path = synthetic_wheel(tmp_path)
    dropped = trim_wheel.trim_wheel(path)
    assert [Path(name).name for name in dropped] == sorted(
        f"libbitsandbytes_{lib}.so" for lib in ("cuda118", "cuda126", "rocm64", "rocm72", "xpu2025", "xpu2026"))
    with zipfile.ZipFile(path) as wheel:
        assert wheel.testzip() is None
        names = set(wheel.namelist())
        assert {name for name in names if name.endswith(".so")} == {
            f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda128", "cuda130", "cuda132")}
        rows = list(csv.reader(io.StringIO(wheel.read("bitsandbytes-0.0.dist-info/RECORD").decode())))
        assert {row[0] for row in rows} == names  # every file listed once, nothing listed that is gone
        for name, digest, size in rows:
            if digest:  # RECORD lists itself without a hash
                assert record_line(name, wheel.read(name)) == f"{name},{digest},{size}\n", name
    assert trim_wheel.trim_wheel(path) == []  # a second pass (gpu_wheels.sh rerun) changes nothing


def test_the_installed_bitsandbytes_would_keep_cpu_and_recent_cuda_only():
    spec = importlib.util.find_spec("bitsandbytes")
    libraries = sorted(path.name for path in Path(spec.origin).parent.glob("libbitsandbytes_*.so"))
    kept = [name for name in libraries if trim_wheel.keeps(f"bitsandbytes/{name}")]
    assert "libbitsandbytes_cpu.so" in kept and any(name.startswith("libbitsandbytes_cuda") for name in kept)
    for name in kept:
        version = name.removeprefix("libbitsandbytes_").removesuffix(".so")
        assert version == "cpu" or (version.startswith("cuda") and int(version[4:]) >= 128), name
    assert not any(trim_wheel.keeps(f"bitsandbytes/{name}") for name in libraries if "rocm" in name or "xpu" in name)
    assert trim_wheel.keeps("bitsandbytes/functional.py") and trim_wheel.keeps("bitsandbytes-0.0.dist-info/RECORD")
