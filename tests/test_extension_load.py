"""When vqkernels._C cannot load, the package still imports, warns once saying why and what to
do (naming the torch it was built for and the one installed), and the C++ backends say so. Built
on torch's stable ABI, it loads in every torch 2.x from its target on."""
import textwrap

import pytest
import torch

from vqkernels import _ext
from helpers import run_python


def test_message_names_both_torch_versions_on_a_mismatch():
    message = _ext.load_failure_message("not imported: too old", "2.10", "2.9.1")
    assert "built for torch >= 2.10" in message and "torch 2.9.1 is installed" in message
    assert "pip install --no-build-isolation" in message


def test_message_without_a_built_extension():
    message = _ext.load_failure_message("ModuleNotFoundError: no _C", None, "2.14.1")
    assert "No built extension was found" in message


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
def test_extension_says_which_torch_it_was_built_for():
    from vqkernels._version import __torch_target__

    info = _ext.build_info()
    assert _ext.built_for_torch_target() == __torch_target__ == info["torch_target"]
    assert _ext.build_markers()["for-torch"] == info["torch_version"]
    assert _ext._release(torch.__version__) >= _ext._release(__torch_target__)


def test_a_failed_load_warns_once_and_falls_back():
    blocked = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vqkernels._C":
                    raise ImportError("undefined symbol: simulated")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vqkernels, vqkernels.ops
            import torch
            out = vqkernels.ops.timestep_embedding(torch.arange(3), 8)
        messages = [str(w.message) for w in caught if "vqkernels._C" in str(w.message)]
        print(len(messages), out.shape[1])
        print(messages[0] if messages else "")
    """)
    run = run_python("-c", blocked, timeout=120)
    assert run.returncode == 0, run.stderr
    counts, message = run.stdout.splitlines()[:2]
    assert counts.split() == ["1", "8"]
    assert "did not load (ImportError: undefined symbol: simulated)" in message


@pytest.mark.parametrize("target, built_cuda, installed, installed_cuda, reason", [
    ("2.10", "13.0", "2.14.1+cu130", "13.0", None),
    ("2.10", "13.0", "2.10.0+cu130", "13.0", None),  # the target itself
    ("2.10", "13.0", "2.11.0", "13.0", None),  # any later 2.x
    ("2.10", "", "2.14.1+cpu", None, None),  # C++ CPU kernels only
    ("2.10", "", "2.12.0+cu126", "12.6", None),
    ("2.10", "13.0", "2.9.1+cu130", "13.0", "built for torch 2.10 or a later 2.x, and torch 2.9.1"),
    ("2.10", "13.0", "3.0.0+cu130", "13.0", "built for torch 2.10 or a later 2.x"),
    ("2.10", "13.0", "2.14.1+cpu", None, "torch 2.14.1+cpu has no CUDA"),
    ("2.10", "13.0", "2.14.1+cu126", "12.6", "built for CUDA 13.0, and torch 2.14.1+cu126"),
    (None, None, "2.14.1", None, None),  # no extension: the import says why
])
def test_an_incompatible_extension_is_not_imported(target, built_cuda, installed,
                                                   installed_cuda, reason):
    found = _ext.incompatibility(target, built_cuda, installed, installed_cuda)
    assert found is None if reason is None else reason in found, found


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
def test_under_a_torch_older_than_its_target_the_extension_stays_out():
    """The extension is not imported under a torch older than its target (faked): one warning
    naming both, info() says why, the reference backend runs and the C++ one says why not."""
    script = textwrap.dedent("""
        import sys, warnings
        import torch
        torch.__version__ = "2.9.1+cpu"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import vqkernels
            from vqkernels import ops
        messages = [str(w.message) for w in caught if "vqkernels._C" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        assert "vqkernels._C" not in sys.modules
        print(vqkernels.info(print_it=False)["extension"]["error"])
        print(ops.timestep_embedding(torch.arange(3), 8, backend="reference").shape[1])
        try:
            ops.timestep_embedding(torch.arange(3), 8, backend="cpu")
        except vqkernels.BackendUnavailableError as error:
            print("unavailable:", error)
    """)
    run = run_python("-c", script, timeout=120)
    assert run.returncode == 0, run.stderr
    warning, error, width, unavailable = run.stdout.splitlines()[:4]
    assert "built for torch >= 2.10, and torch 2.9.1+cpu is installed" in warning
    assert "not imported: built for torch" in error and width == "8"
    assert unavailable.startswith("unavailable:") and "not imported" in unavailable
