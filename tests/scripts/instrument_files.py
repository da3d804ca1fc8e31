"""Fetch the real instrument files the reader tests use, from packages on PyPI.

``python tests/scripts/instrument_files.py DEST`` (``make testdata``) downloads, with
pip and without installing them, the HyperSpy 1.7.6 wheel (its ``hyperspy/tests/io``
data: a Velox EMD HAADF image, DigitalMicrograph DM3/DM4 files, TIFFs saved by ImageJ
and by DigitalMicrograph) and the mrcfile 1.5.4 sdist (``tests/test_data``: an MRC
image written by Thermo Fisher EPU 2.9), and copies the listed files into DEST,
each checked against its SHA-256. Files already present and correct are kept.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HYPERSPY = "hyperspy==1.7.6"
MRCFILE = "mrcfile==1.5.4"
H = "hyperspy/tests/io/"
#: name in DEST -> (package, member in its archive [, member inside a nested zip], sha256)
FILES = {
    "fei_emd_image.emd": (HYPERSPY, H + "emd_files/fei_emd_files.zip", "fei_emd_image.emd",
                          "0a3c49f436d914a29a3801ce31448fbdfe4a5b82f2b9f3b71c736851f9ff0508"),
    "test_STEM_image.dm3": (HYPERSPY, H + "dm3_2D_data/test_STEM_image.dm3", None,
                            "fcba806af75bc3c2e50e7d7b0626cba545c1464f39e99c8922b225b0b0b0224c"),
    "test_loading_image_saved_with_imageJ.tif": (HYPERSPY, H + "tiff_files/test_loading_image_saved_with_imageJ.tif",
                                                 None, "303dcaf1c33ec4112033fce92069ff7a7a93010f21414ea0620240f6266eeb9d"),
    "test_loading_image_saved_with_DM.tif": (HYPERSPY, H + "tiff_files/test_loading_image_saved_with_DM.tif", None,
                                             "e8d966494793142176f39e0c66fd4911d33d083136178458e08212bae5f029d4"),
    **{f"dm{v}_test-{n}.dm{v}": (HYPERSPY, H + f"dm{v}_2D_data/test-{n}.dm{v}", None, None)
       for v in (3, 4) for n in (1, 6, 7, 9, 10, 11)},
    "epu2.9_example.mrc": (MRCFILE, "mrcfile-1.5.4/tests/test_data/epu2.9_example.mrc", None,
                           "c52b35f70216ba6ffed7523c70810806117676f463ee4f15c1da18697caf8653"),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(spec: str, where: Path) -> Path:
    sdist = spec.startswith("mrcfile")
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(where), spec]
    args += ["--no-binary", spec.split("==")[0]] if sdist else ["--only-binary", ":all:", "--python-version", "3.11",
                                                                  "--platform", "manylinux2014_x86_64"]
    subprocess.run(args, check=True)
    (archive,) = [p for p in where.iterdir() if p.name.lower().startswith(spec.split("==")[0])]
    return archive


def _member(archive: Path, name: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(name)
    with tarfile.open(archive) as t:
        return t.extractfile(name).read()


def fetch(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {k: v for k, v in FILES.items()
              if not (dest / k).is_file() or (v[3] and _sha256((dest / k).read_bytes()) != v[3])}
    if not wanted:
        return
    with tempfile.TemporaryDirectory() as tmp:
        archives = {}
        for name, (package, member, inner, digest) in wanted.items():
            if package not in archives:
                folder = Path(tmp) / package.split("==")[0]
                folder.mkdir()
                archives[package] = _download(package, folder)
            data = _member(archives[package], member)
            if inner is not None:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    data = z.read(inner)
            if digest and _sha256(data) != digest:
                raise SystemExit(f"{package}:{member}: SHA-256 {_sha256(data)}, expected {digest}")
            (dest / name).write_bytes(data)
    print(f"instrument test files in {dest}: {', '.join(sorted(FILES))}")


if __name__ == "__main__":
    fetch(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data" / "instrument"))
