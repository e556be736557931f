"""Readers for what ``scripts/gpu_check.sh`` leaves behind, for ``vqkernels.bench.summary``.

Any input may be missing or cut short (a step that failed or timed out), and a
summary must still be written, so every reader returns an empty result or
what it could read and never raises on bad input. Inputs: the steps file
(``read_steps``), the junit XML of ``pytest -m cuda`` or else its ``-v`` log,
the compute-sanitizer log of ``pytest -v`` under memcheck, and the selftest
and bench JSON. Tests and selftest rows are sorted into the bench's op
families (``FAMILIES``) and backends (``classify``).
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("timestep", "search", "ema", "quantizer", "rvq", "ddim", "attention", "adaln",
            "models")
STEP_STATUSES = ("ok", "failed", "timed out", "not run")
# test module prefix -> op family (test_reference_X counts as test_X; test_search_kernels
# as test_search); modules that match none count as "other".
TEST_FAMILIES = {
    "test_timestep": "timestep", "test_search": "search",
    "test_ema": "ema", "test_kmeans": "ema", "test_distributed": "ema",
    "test_quantizer": "quantizer", "test_vector_quantize": "quantizer",
    "test_residual_vq": "rvq", "test_residual_nearest_code": "rvq",
    "test_ddim": "ddim", "test_sampler": "ddim", "test_scheduler": "ddim",
    "test_attention": "attention", "test_adaln": "adaln", "test_dit_block": "adaln",
    "test_gelu": "adaln", "test_group_norm": "models",
    "test_dit_model": "models", "test_dit_diffusers": "models", "test_vqgan": "models",
    "test_llamagen": "models", "test_demo": "models",
}


def family_of_module(module: str) -> str:
    """The op family a test module belongs to, by its longest matching prefix."""
    module = module.replace("test_reference_", "test_", 1)
    matches = [prefix for prefix in TEST_FAMILIES if module.startswith(prefix)]
    return TEST_FAMILIES[max(matches, key=len)] if matches else "other"


# selftest op -> op family (vector_quantize is the quantizer modules' op)
SELFTEST_FAMILIES = {
    "timestep_embedding": "timestep", "nearest_code": "search",
    "nearest_code_with_stats": "search", "vector_quantize": "quantizer",
    "residual_nearest_code": "rvq",
    "code_counts_and_sums": "ema", "ema_update_": "ema", "ema_update_stages_": "ema",
    "ddim_step": "ddim",
    "attention": "attention", "layer_norm_modulate": "adaln", "gated_residual": "adaln",
    "gated_residual_layer_norm_modulate": "adaln", "gelu_tanh": "adaln", "group_norm": "models",
}
# Sanitizer lines that start a record but are not errors (ERROR SUMMARY does not count them).
_SANITIZER_NOT_ERRORS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "LEAK SUMMARY",
                         "Target application returned", "Error: process")
# pytest -v prints each id, then (maybe after kernel or sanitizer output) its outcome.
_TOKENS = re.compile(
    r"(?<!=)========= (?P<record>\S[^\n]*)"
    r"|(?P<test>[\w./-]+\.py::[^\s]+)"
    r"|\b(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_REPORT_SECTIONS = re.compile(r"^=+ (FAILURES|ERRORS|warnings summary|short test summary info)"
                              r" =+$", re.M)
_ERROR_SUMMARY = re.compile(r"========= ERROR SUMMARY: (\d+) errors?")


@dataclass
class Step:
    """One step of gpu_check.sh: its status, exit code (None: not run) and seconds."""

    name: str
    status: str
    code: int | None = None
    seconds: float | None = None
    note: str = ""


@dataclass(frozen=True)
class TestResult:
    """One pytest test: its id, op family, backend and outcome."""

    id: str
    family: str
    backend: str
    outcome: str  # passed, failed, error, skipped


@dataclass
class Memcheck:
    """compute-sanitizer's verdict: tests that finished under it and errors charged to each."""

    tests: dict[str, TestResult] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # test id -> error records
    outside_tests: int = 0  # error records before the first test id
    total: int | None = None  # the ERROR SUMMARY count (None: no summary, e.g. killed)


def read_steps(path: str | Path | None) -> dict[str, Step]:
    """The steps file as name -> Step (later lines win); {} when missing.

    One ``name<TAB>status<TAB>exit<TAB>seconds<TAB>note`` line per step, status
    one of ``STEP_STATUSES``; other lines are skipped.
    """
    steps = {}
    for line in _text(path).splitlines():
        name, status, code, seconds, note = (line.split("\t") + [""] * 5)[:5]
        if not name or status not in STEP_STATUSES:
            continue
        steps[name] = Step(name, status, int(code) if code.lstrip("-").isdigit() else None,
                           float(seconds) if _is_number(seconds) else None, note)
    return steps


def read_junit(path: str | Path | None) -> list[TestResult] | None:
    """The test cases of a junit XML (xunit1 or xunit2); None when missing or not junit
    (e.g. cut short)."""
    text = _text(path)
    if not text:
        return None
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return None
    return [classify(_junit_id(case), _junit_outcome(case)) for case in root.iter("testcase")]


def _junit_id(case: ElementTree.Element) -> str:
    if case.get("file"):
        return f"{case.get('file')}::{case.get('name', '')}"
    parts = case.get("classname", "").split(".")
    module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
    path = "/".join(parts[:module + 1]) + ".py"
    return "::".join([path, *parts[module + 1:], case.get("name", "")])


def _junit_outcome(case: ElementTree.Element) -> str:
    for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        if case.find(tag) is not None:
            return outcome
    return "passed"


def read_pytest_log(path: str | Path | None) -> list[TestResult] | None:
    """Outcomes of the tests a ``pytest -v`` log reports; None when no test is in it."""
    tests = _scan_verbose_log(_text(path)).tests
    return list(tests.values()) or None


def read_sanitizer_log(path: str | Path | None) -> Memcheck | None:
    """Tests finished under memcheck and the error records charged to each; None if no log.

    The log is of ``pytest -v`` run under compute-sanitizer: each error record is
    charged to the test whose id pytest printed last before it.
    """
    text = _text(path)
    if not text:
        return None
    memcheck = _scan_verbose_log(text)
    counts = _ERROR_SUMMARY.findall(text)
    memcheck.total = int(counts[-1]) if counts else None
    return memcheck


def _scan_verbose_log(text: str) -> Memcheck:
    """Walk test ids, outcomes and sanitizer records in order, up to pytest's report sections."""
    section = _REPORT_SECTIONS.search(text)
    memcheck, current = Memcheck(), None
    for token in _TOKENS.finditer(text, 0, section.start() if section else len(text)):
        if token["test"]:
            current = token["test"]
        elif token["outcome"] and current and current not in memcheck.tests:
            memcheck.tests[current] = classify(current, token["outcome"].lower())
        elif token["record"] and not token["record"].startswith(_SANITIZER_NOT_ERRORS):
            if current is None:
                memcheck.outside_tests += 1
            else:
                memcheck.errors[current] = memcheck.errors.get(current, 0) + 1
    return memcheck


def classify(test_id: str, outcome: str) -> TestResult:
    """A test's op family (from its module) and backend (from its name and parameters):
    ``cuda``, ``triton``, ``reference``, ``cpu``, or ``any`` for a test that names none."""
    module = Path(test_id.split("::")[0]).stem
    name = test_id.split("::")[-1]
    params = name[name.index("[") + 1:-1].split("-") if "[" in name else []
    if "triton" in module or "triton" in params:
        backend = "triton"
    elif module.endswith("_cuda_kernel"):
        backend = "cuda"
    elif "reference" in params:
        backend = "reference"
    elif "cuda" in params or "cuda" in name.split("[")[0]:
        backend = "cuda"
    elif "triton" in name:
        backend = "triton"
    elif "cpu" in params:
        backend = "cpu"
    else:
        backend = "any"
    outcome = {"xfail": "skipped", "xpass": "passed"}.get(outcome, outcome)
    return TestResult(test_id, family_of_module(module), backend, outcome)


def read_json(path: str | Path | None) -> dict | None:
    """A JSON document (the selftest's or the bench's); None when missing or unreadable."""
    try:
        document = json.loads(_text(path))
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def selftest_family(op: str) -> str:
    return SELFTEST_FAMILIES.get(op, "other")


def _text(path: str | Path | None) -> str:
    if path is None:
        return ""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
