"""The sdist holds exactly the tracked source: everything setup.py and CMakeLists.txt read
(headers, csrc/sources.txt, csrc/build_config.h.in), and no build outputs."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {".gitignore", ".ci/run"}
GENERATED = ("PKG-INFO", "setup.cfg", "vqkernels.egg-info/")


def tracked_files() -> set[str]:
    """Files git tracks or would track (not ignored), that exist."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    return {p for p in listing.splitlines() if (ROOT / p).is_file()} - NOT_SHIPPED


def sdist_files(outdir: Path) -> set[str]:
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                    str(outdir), str(ROOT)], check=True, capture_output=True, timeout=300)
    (archive,) = outdir.glob("vqkernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    return {n for n in names if not n.startswith(GENERATED)}


@pytest.mark.slow
def test_sdist_holds_exactly_the_tracked_files(tmp_path):
    tracked, shipped = tracked_files(), sdist_files(tmp_path)
    assert not tracked - shipped, f"missing from the sdist: {sorted(tracked - shipped)}"
    assert not shipped - tracked, f"in the sdist but not tracked: {sorted(shipped - tracked)}"
    assert {"csrc/sources.txt", "csrc/build_config.h.in", "LICENSE"} <= shipped
