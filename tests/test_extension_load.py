"""When vqkernels._C cannot load, the package still imports, warns once saying why and what to
do (naming the torch it was built for and the one installed), and the C++ backends say so."""
import subprocess
import sys
import textwrap

import pytest
import torch

from vqkernels import _ext


def test_message_names_both_torch_versions_on_a_mismatch():
    message = _ext.load_failure_message("ImportError: undefined symbol", "2.11.0+cu130", "2.14.1")
    assert "built for torch 2.11.0+cu130" in message and "torch 2.14.1 is installed" in message
    assert "pip install --no-build-isolation" in message


def test_message_without_a_built_extension():
    message = _ext.load_failure_message("ModuleNotFoundError: no _C", None, "2.14.1")
    assert "No built extension was found" in message


@pytest.mark.skipif(_ext._C is None, reason="needs the built extension")
def test_extension_says_which_torch_it_was_built_for():
    assert _ext.built_for_torch() == torch.__version__ == _ext.build_info()["torch_version"]


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
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    counts, message = run.stdout.splitlines()[:2]
    assert counts.split() == ["1", "8"]
    assert "did not load (ImportError: undefined symbol: simulated)" in message
