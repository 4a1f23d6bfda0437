// Python module for calibprune._cuda. The ops register with TORCH_LIBRARY_FRAGMENT(calibprune_cuda, m) in their
// own files and are called as torch.ops.calibprune_cuda.<name>; importing this module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "calibprune CUDA kernels"; }
