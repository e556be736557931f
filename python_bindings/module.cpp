// The Python module vqkernels._C, on CPython's limited API (one abi3 binary for every
// Python from 3.10 on) and torch's stable ABI (every torch from TORCH_TARGET_VERSION on).
// Importing it loads the library, whose static initializers register the torch ops
// (csrc/op_registry.cpp); the module itself only carries the build facts, as attributes.
#include <Python.h>

#include <vector>

#include "build_config.h"
#include "vqkernels.h"

// What this file was built against, read from its bytes by vqkernels._ext before
// importing it: the torch of its headers, the oldest torch it loads in, and the CUDA of
// its kernels ("" without). A binary for a torch too old or another CUDA major is not
// imported at all.
extern "C" __attribute__((used, visibility("default"))) const char vqkernels_built_for_torch[] =
    "vqkernels-built-for-torch=" VQKERNELS_TORCH_VERSION;
extern "C" __attribute__((used, visibility("default"))) const char vqkernels_torch_target[] =
    "vqkernels-built-for-torch-target=" VQKERNELS_TORCH_TARGET;
extern "C" __attribute__((used, visibility("default"))) const char vqkernels_built_with_cuda[] =
    "vqkernels-built-with-cuda=" VQKERNELS_CUDA_VERSION;

namespace {

std::vector<int64_t> cuda_attention_head_dims() {
#ifdef VQKERNELS_WITH_CUDA
  return vqkernels::attention_head_dims_cuda();
#else
  return {};
#endif
}

// A new reference to a tuple of the head dims, or null with a Python error set.
PyObject* head_dims_tuple() {
  const std::vector<int64_t> dims = cuda_attention_head_dims();
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(dims.size()));
  for (size_t i = 0; tuple != nullptr && i < dims.size(); ++i) {
    PyObject* item = PyLong_FromLongLong(dims[i]);
    if (item == nullptr || PyTuple_SetItem(tuple, static_cast<Py_ssize_t>(i), item) < 0) {
      Py_DECREF(tuple);
      return nullptr;
    }
  }
  return tuple;
}

// The module's attributes; 0, or -1 with a Python error set.
int add_build_facts(PyObject* module) {
  PyObject* head_dims = head_dims_tuple();
  if (head_dims == nullptr || PyModule_AddObject(module, "cuda_attention_head_dims", head_dims)) {
    Py_XDECREF(head_dims);
    return -1;
  }
  const bool ok =
      !PyModule_AddStringConstant(module, "version", VQKERNELS_VERSION) &&
      !PyModule_AddStringConstant(module, "torch_version", VQKERNELS_TORCH_VERSION) &&
      !PyModule_AddStringConstant(module, "torch_target", VQKERNELS_TORCH_TARGET) &&
      !PyModule_AddIntConstant(module, "openmp", vqkernels::built_with_openmp()) &&
      !PyModule_AddIntConstant(module, "cpu_search_screen", vqkernels::cpu_search_screens()) &&
      !PyModule_AddIntConstant(module, "cuda", vqkernels::built_with_cuda()) &&
      !PyModule_AddStringConstant(module, "cuda_version", VQKERNELS_CUDA_VERSION) &&
      !PyModule_AddStringConstant(module, "cuda_archs", VQKERNELS_CUDA_ARCHS);
  return ok ? 0 : -1;
}

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "vqkernels._C",
    "vqkernels compiled kernels (C++ CPU and CUDA); the ops live in torch.ops.vqkernels",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && add_build_facts(module) < 0) Py_CLEAR(module);
  return module;
}
