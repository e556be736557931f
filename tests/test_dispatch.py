"""Backend dispatch: the cautious ``auto`` on CUDA (verified backends first, then Triton before
hand-written CUDA) on a faked CUDA device, and the verified table's link to committed results."""
import json
from pathlib import Path

import pytest
import torch

from vqkernels import _dispatch, _ext, _verified
from vqkernels._selftest import selftest
from vqkernels._verified import Verification
from vqkernels.ops import ddim, ema, search, timestep
from vqkernels.ops.flash_attention import DISPATCH as ATTENTION

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda", 0)
H100, A100 = (9, 0), (8, 0)
# (dispatch, dtype, shape facts) of every op, as the op itself asks.
OPS = {
    "timestep_embedding": (timestep.DISPATCH, torch.float32, {}),
    "nearest_code": (search.DISPATCH, torch.float32, {"dim": 32}),
    "code_counts_and_sums": (ema.STATS_DISPATCH, torch.float32, {}),
    "ema_update_": (ema.DISPATCH, torch.float32, {"codebook_dtype": torch.float32}),
    "attention": (ATTENTION, torch.bfloat16, {"head_dim": 72}),
    "ddim_step": (ddim.DISPATCH, torch.float32, {}),
}


def entry(op, backend, capability=H100, results="benchmarks/results/run.json"):
    return Verification(op, backend, capability, "NVIDIA Fake GPU", "2027-01-05", results)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device of capability 9.0 whose kernels are all loadable; VERIFIED starts empty.

    Returns a function that sets the verified entries."""
    monkeypatch.setattr(_dispatch, "device_capability", lambda device: H100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: H100)
    monkeypatch.setattr(_ext, "cuda_kernels_reasons", lambda: [])
    monkeypatch.setattr(_dispatch, "triton_reasons", lambda device: [])
    monkeypatch.setattr(_verified, "VERIFIED", ())
    return lambda *entries: monkeypatch.setattr(_verified, "VERIFIED", tuple(entries))


def auto(op, device=CUDA, **shape):
    dispatch, dtype, facts = OPS[op]
    return dispatch.select("auto", device, dtype, **{**facts, **shape}).name


@pytest.mark.parametrize("op", sorted(OPS))
def test_unverified_auto_on_cuda_takes_triton(fake_cuda, op):
    assert auto(op) == "triton"


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_verified_cuda_backend_comes_first(fake_cuda, op):
    fake_cuda(entry(OPS[op][0].op, "cuda"))
    assert auto(op) == "cuda"


def test_verification_counts_only_for_its_compute_capability(fake_cuda, monkeypatch):
    fake_cuda(entry("timestep_embedding", "cuda", capability=A100))
    assert auto("timestep_embedding") == "triton"
    monkeypatch.setattr(_dispatch, "device_capability", lambda device: A100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: A100)
    assert auto("timestep_embedding") == "cuda"


def test_verified_backends_keep_the_op_order(fake_cuda):
    fake_cuda(entry("timestep_embedding", "cuda"), entry("timestep_embedding", "triton"),
              entry("attention", "cuda"), entry("attention", "triton"))
    assert timestep.DISPATCH.auto_order["cuda"] == ("cuda", "triton")
    assert auto("timestep_embedding") == "cuda"
    assert ATTENTION.auto_order["cuda"] == ("triton", "cuda")
    assert auto("attention") == "triton"


def test_a_verified_backend_outranks_the_op_order(fake_cuda):
    fake_cuda(entry("attention", "cuda"))
    assert auto("attention") == "cuda"
    fake_cuda(entry("timestep_embedding", "triton"))
    assert auto("timestep_embedding") == "triton"


def test_verified_backends_still_obey_limits_and_auto_skip(fake_cuda):
    fake_cuda(entry("nearest_code", "cuda"), entry("attention", "cuda"))
    assert auto("nearest_code", dim=search.CUDA_AUTO_MAX_DIM) == "cuda"
    assert auto("nearest_code", dim=search.CUDA_AUTO_MAX_DIM + 1) == "triton"  # auto_skip
    assert ATTENTION.select("auto", CUDA, torch.float32, head_dim=72).name == "triton"  # dtype


def test_an_explicit_backend_runs_unverified(fake_cuda):
    assert timestep.DISPATCH.select("cuda", CUDA, torch.float32).name == "cuda"


def test_auto_on_cpu_keeps_the_op_order_without_a_capability(fake_cuda, monkeypatch):
    def no_capability(device):
        raise AssertionError("a CPU dispatch asked for a compute capability")

    monkeypatch.setattr(_dispatch, "device_capability", no_capability)
    cpu = torch.device("cpu")
    for dispatch, _, _ in OPS.values():
        assert dispatch.auto_candidates(cpu) == dispatch.auto_order["cpu"] + ("reference",)


def test_the_capability_lookup_compiles_into_one_graph(monkeypatch):
    """auto on CUDA inside torch.compile(fullgraph=True): the lookup is a traced constant."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: H100)
    monkeypatch.setattr(_ext, "cuda_kernels_reasons", lambda: [])
    monkeypatch.setattr(_verified, "VERIFIED", (entry("timestep_embedding", "cuda"),))
    _dispatch._capability_of.cache_clear()
    try:
        def chosen_name_length(x):
            return x + len(timestep.DISPATCH.select("auto", CUDA, torch.float32).name)

        assert torch.compile(chosen_name_length, fullgraph=True)(torch.zeros(1)).item() == 4
    finally:
        _dispatch._capability_of.cache_clear()


# --- the verified table and the results files behind it -----------------------------------

def test_every_verified_entry_rests_on_a_committed_passing_result():
    dispatch_ops = {d.op for d, _, _ in OPS.values()}
    for verified in _verified.VERIFIED:
        assert verified.op in dispatch_ops, f"{verified}: no dispatch named {verified.op!r}"
        assert verified.backend in _verified.GPU_BACKENDS, verified
        assert _verified.entry_problems(verified, ROOT) == [], verified


@pytest.fixture(scope="module")
def gpu_document(tmp_path_factory):
    """A real selftest JSON of timestep_embedding, relabelled as a complete run on a GPU."""
    path = tmp_path_factory.mktemp("selftest") / "cpu.json"
    selftest("cpu", ops=["timestep_embedding"], json_path=str(path), print_table=False)
    document = json.loads(path.read_text())
    document.update(device_type="cuda", device="NVIDIA Fake GPU", capability=list(H100),
                    complete=True, date="2027-01-05T10:00:00+00:00")
    for row in document["rows"]:
        row["backend"] = {"cpu": "cuda", "reference": "reference"}.get(row["backend"], "triton")
    return document


def write_results(root, document, name="run.json"):
    path = root / "benchmarks" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def test_a_passing_results_file_becomes_entries(gpu_document, tmp_path, monkeypatch):
    write_results(tmp_path, gpu_document)
    monkeypatch.chdir(tmp_path)
    entries = _verified.entries_from_selftest("benchmarks/results/run.json")
    assert entry("timestep_embedding", "cuda") in entries
    assert all(e.backend in _verified.GPU_BACKENDS for e in entries), entries
    for made in entries:
        assert _verified.entry_problems(made, tmp_path) == []


def test_a_failed_row_makes_no_entry_and_breaks_an_existing_one(gpu_document, tmp_path,
                                                                 monkeypatch):
    document = json.loads(json.dumps(gpu_document))
    next(r for r in document["rows"] if r["backend"] == "cuda")["passed"] = False
    write_results(tmp_path, document)
    monkeypatch.chdir(tmp_path)
    assert not [e for e in _verified.entries_from_selftest("benchmarks/results/run.json")
                if e.backend == "cuda"]
    problems = _verified.entry_problems(entry("timestep_embedding", "cuda"), tmp_path)
    assert any("failed" in p for p in problems), problems


@pytest.mark.parametrize("change,complaint", [
    (dict(results="benchmarks/results/missing.json"), "no such file"),
    (dict(results="elsewhere/run.json"), "under benchmarks/results/"),
    (dict(capability=A100), "capability"),
    (dict(device="NVIDIA Other GPU"), "device"),
    (dict(date="2027-02-01"), "date"),
    (dict(op="ddim_step"), "no rows"),
])
def test_entry_problems_name_the_mismatch(gpu_document, tmp_path, change, complaint):
    write_results(tmp_path, gpu_document)
    fields = {**entry("timestep_embedding", "cuda").__dict__, **change}
    problems = _verified.entry_problems(Verification(**fields), tmp_path)
    assert any(complaint in p for p in problems), problems


@pytest.mark.parametrize("change,complaint", [
    (dict(device_type="cpu"), "not a selftest run on a CUDA device"),
    (dict(complete=False), "subset"),
])
def test_only_complete_gpu_runs_make_entries(gpu_document, tmp_path, change, complaint):
    path = write_results(tmp_path, {**gpu_document, **change})
    with pytest.raises(ValueError, match=complaint):
        _verified.entries_from_selftest(path)


def test_gpu_status_says_where_and_when_or_not_yet(monkeypatch):
    monkeypatch.setattr(_verified, "VERIFIED", (entry("attention", "triton"),))
    assert _verified.gpu_status("attention", "triton") == \
        "verified on NVIDIA Fake GPU (sm_90), 2027-01-05"
    assert _verified.gpu_status("attention", "cuda") == "not yet run on a GPU"
