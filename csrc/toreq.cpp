// The extension module `toreq._C`. It has no Python functions: importing it runs the static
// operator registrations of csrc/ops (schemas) and of each backend folder (kernels), which
// then appear as torch.ops.toreq.*.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "toreq's C++/CUDA operators, registered as torch.ops.toreq.*",
      -1,       // no per-module state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
