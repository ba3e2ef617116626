// Entry point of the ahead-of-time build (`FASTLORA_BUILD_EXT=1 pip install .`), which Python imports as
// fastlora._C. The ops register themselves through TORCH_LIBRARY when the library loads; the module is empty.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
