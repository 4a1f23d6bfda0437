// Python module for calibprune._cpp. The ops themselves register with TORCH_LIBRARY_FRAGMENT(calibprune_cpp, m)
// in their own files and are called as torch.ops.calibprune_cpp.<name>; importing this module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "calibprune C++/OpenMP CPU kernels"; }
