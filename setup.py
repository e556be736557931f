"""Builds vqkernels and its extension vqkernels._C.

Build knobs, all read here:
  VQKERNELS_BUILD_CUDA   unset: build the CUDA kernels when nvcc and a CUDA build
                         of torch are present; 0: never; 1: always (fail if impossible).
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0+PTX": SASS for sm_80 (A100)
                         and sm_90 (H100 / H200), and compute_90 PTX that newer GPUs
                         JIT-compile.
  CUDA_HOME              CUDA toolkit root; found from `nvcc` when unset.
  MAX_JOBS               parallel compile jobs (ninja).

The extension is built on torch's stable ABI (TORCH_TARGET_VERSION =
vqkernels/_version.py's __torch_target__) and CPython's limited API, so one
wheel serves every torch from that target on and every Python from 3.10 on
(cp310-abi3). Its CUDA kernels still need the CUDA major they were built with:
the version's PEP 440 local label names it (0.1.0+cu130, 0.1.0+cpu) and the
metadata pins torch>=2.10. An sdist has no label.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0+PTX"
BUILDING_SDIST = "sdist" in sys.argv  # setuptools.build_meta runs `setup.py sdist`


def read_version(name="__version__"):
    text = (ROOT / "vqkernels" / "_version.py").read_text()
    return re.search(rf'{name} = "(.+)"', text).group(1)


def torch_target_version(target):
    """TORCH_TARGET_VERSION for "2.10": major and minor in the top two bytes, as torch's
    headeronly/version.h packs its TORCH_VERSION_2_10_0."""
    major, minor = (int(part) for part in target.split("."))
    return f"0x{major:02x}{minor:02x}000000000000"


def read_sources():
    """csrc/sources.txt: the one source list shared with CMakeLists.txt."""
    sources = {"cpu": [], "cuda": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, path = line.split()
            sources[kind].append(path)
    return sources


def find_cuda_home():
    """The toolkit root. The `nvcc` on PATH may be a wrapper script, so ask it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1)) if match else str(Path(nvcc).resolve().parent.parent)


def nvidia_pip_include_dirs():
    """Headers torch's CUDA headers include (cuBLAS, cuSPARSE) ship in the nvidia pip packages."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [str(p) for base in spec.submodule_search_locations
            for p in sorted(Path(base).glob("cu*/include"))]


def cuda_build_decision(torch, cuda_home):
    """(build_cuda, reason). VQKERNELS_BUILD_CUDA=1 turns every reason into an error."""
    forced = os.environ.get("VQKERNELS_BUILD_CUDA")
    if forced == "0":
        return False, "VQKERNELS_BUILD_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU-only build")
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        problems.append("nvcc not found (set CUDA_HOME)")
    if problems and forced == "1":
        sys.exit("VQKERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    return not problems, "; ".join(problems)


def write_build_config(out_dir, values):
    template = (ROOT / "csrc" / "build_config.h.in").read_text()
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "build_config.h").write_text(template)


def built_for(torch, build_cuda, target):
    """(the PEP 440 local version label, the torch requirement) of a build against ``torch``
    whose kernels load in every torch from ``target`` on."""
    return "cu" + torch.version.cuda.replace(".", "") if build_cuda else "cpu", f"torch>={target}"


def make_extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    build_cuda, reason = cuda_build_decision(torch, cuda_home)
    print(f"vqkernels: CUDA kernels {'ON' if build_cuda else 'OFF (' + reason + ')'}")
    sources = read_sources()
    target = read_version("__torch_target__")
    generated = ROOT / "build" / "generated"
    write_build_config(generated, {
        "VQKERNELS_VERSION": read_version(),
        "VQKERNELS_TORCH_VERSION": torch.__version__,
        "VQKERNELS_TORCH_TARGET": target,
        "VQKERNELS_CUDA_VERSION": torch.version.cuda if build_cuda else "",
        "VQKERNELS_CUDA_ARCHS": os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else "",
    })
    # Hidden visibility: the stable ABI's classes are hidden, so that each extension keeps
    # its own copy; nothing is exported but PyInit__C and the build markers.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden"]
    nvcc_flags = ["-O3", "-lineinfo"]  # no fast math: sin/cos of large arguments must stay exact
    macros = [("TORCH_TARGET_VERSION", torch_target_version(target))]
    if build_cuda:
        macros += [("VQKERNELS_WITH_CUDA", None), ("USE_CUDA", None)]  # USE_CUDA: the CUDA shim
        cxx_flags += [f"-idirafter{d}" for d in nvidia_pip_include_dirs()]
    ext_cls = CUDAExtension if build_cuda else CppExtension
    return built_for(torch, build_cuda, target), ext_cls(
        name="vqkernels._C",
        sources=sources["cpu"] + (sources["cuda"] if build_cuda else []) + ["python_bindings/module.cpp"],
        include_dirs=[str(ROOT / "csrc"), str(generated)],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


DEPENDENCIES = ["triton>=3.6; platform_system == 'Linux'", "numpy", "tqdm"]


def main():
    (label, torch_pin), extension = make_extension()  # first: it sets CUDA_HOME
    from torch.utils.cpp_extension import BuildExtension

    if BUILDING_SDIST:
        label = None
    setup(
        version=read_version() + (f"+{label}" if label else ""),
        install_requires=[torch_pin, *DEPENDENCIES],
        packages=find_packages(include=["vqkernels", "vqkernels.*"]),
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
