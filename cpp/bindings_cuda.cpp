// bindings_cuda.cpp -- the CUDA entry points of patchmosaic._core (built with PATCHMOSAIC_CUDA).
// Device buffers arrive as integer addresses with their shapes (torch's data_ptr(), allocated and
// validated by backends/cuda.py), the small index arrays as numpy arrays, and the stream as the
// integer handle of torch.cuda.current_stream(); nothing here knows torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "patch_softmax.hpp"
#include "py_buffers.hpp"

namespace patchmosaic {
namespace {

template <typename T>
T* dev(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// A bad index reaches device memory out of bounds, and on a GPU that kills the whole CUDA context:
// the (small, host) index arrays are checked here first.
void check_csr(const int64_t* ptr, int64_t n, int64_t len, const char* name) {
  if (ptr[0] != 0 || ptr[n] != len) throw std::invalid_argument(std::string(name) + ": offsets do not span the array");
  for (int64_t i = 0; i < n; ++i)
    if (ptr[i + 1] < ptr[i]) throw std::invalid_argument(std::string(name) + ": offsets decrease");
}

void check_range(const int32_t* v, int64_t len, int64_t hi, const char* name) {
  for (int64_t i = 0; i < len; ++i)
    if (v[i] < 0 || v[i] >= hi) throw std::invalid_argument(std::string(name) + " holds an index outside 0.." + std::to_string(hi - 1));
}

// fill_groups, then every group index checked against the training images and the groups
template <typename Args>
void fill_checked_groups(Args& A, const py::array& a, const py::array& inv_2b2, const py::array& grp_img_ptr,
                         const py::array& grp_img, const py::array& group_of_b) {
  fill_groups(A, a, inv_2b2, grp_img_ptr, grp_img, group_of_b);
  check_csr(A.grp_img_ptr, A.n_groups, grp_img.shape(0), "grp_img_ptr");
  check_range(A.grp_img, grp_img.shape(0), A.N, "grp_img");
  check_range(A.group_of_b, A.B, A.n_groups, "group_of_b");
}

// device outputs; provenance (arg_key, arg_share) is both or neither (address 0)
template <typename T, typename Args>
void set_outputs(Args& A, uintptr_t out, uintptr_t arg_key, uintptr_t arg_share) {
  if ((arg_key == 0) != (arg_share == 0)) throw std::invalid_argument("arg_key and arg_share come together");
  A.out = dev<T>(out);
  A.arg_key = dev<int64_t>(arg_key);
  A.arg_share = dev<T>(arg_share);
}

template <typename T>
void local_cuda(uintptr_t train, std::array<int64_t, 4> tshape, uintptr_t query, std::array<int64_t, 4> qshape, int k,
                int query_pad, int key_pad, const py::array& a, const py::array& inv_2b2, const py::array& cls_qpix_ptr,
                const py::array& cls_qpix, const py::array& cls_kpos_ptr, const py::array& cls_kpos,
                const py::array& grp_img_ptr, const py::array& grp_img, const py::array& group_of_b, uintptr_t out,
                uintptr_t arg_key, uintptr_t arg_share, uintptr_t stream, int device) {
  PatchSoftmaxArgs<T> A;
  A.train = dev<const T>(train);
  A.N = tshape[0]; A.C = static_cast<int>(tshape[1]); A.H = static_cast<int>(tshape[2]); A.W = static_cast<int>(tshape[3]);
  A.query = dev<const T>(query);
  A.B = qshape[0]; A.Hq = static_cast<int>(qshape[2]); A.Wq = static_cast<int>(qshape[3]);
  if (qshape[1] != A.C) throw std::invalid_argument("query and train differ in channels");
  A.k = k; A.query_pad = query_pad; A.key_pad = key_pad;
  A.cls_qpix_ptr = ptr_of<int64_t>(cls_qpix_ptr, "cls_qpix_ptr", 1);
  A.n_classes = cls_qpix_ptr.shape(0) - 1;
  A.cls_qpix = ptr_of<int32_t>(cls_qpix, "cls_qpix", 1);
  A.cls_kpos_ptr = ptr_of<int64_t>(cls_kpos_ptr, "cls_kpos_ptr", 1);
  A.cls_kpos = ptr_of<int32_t>(cls_kpos, "cls_kpos", 1);
  if (cls_kpos_ptr.shape(0) != cls_qpix_ptr.shape(0)) throw std::invalid_argument("class pointer arrays differ in length");
  fill_checked_groups(A, a, inv_2b2, grp_img_ptr, grp_img, group_of_b);
  if (k < 1 || k % 2 == 0) throw std::invalid_argument("k must be odd and positive, got " + std::to_string(k));
  check_csr(A.cls_qpix_ptr, A.n_classes, cls_qpix.shape(0), "cls_qpix_ptr");
  check_csr(A.cls_kpos_ptr, A.n_classes, cls_kpos.shape(0), "cls_kpos_ptr");
  check_range(A.cls_qpix, cls_qpix.shape(0), static_cast<int64_t>(A.Hq) * A.Wq, "cls_qpix");
  check_range(A.cls_kpos, cls_kpos.shape(0), static_cast<int64_t>(A.H) * A.W, "cls_kpos");
  set_outputs<T>(A, out, arg_key, arg_share);
  py::gil_scoped_release nogil;
  patch_softmax_cuda<T>(A, reinterpret_cast<void*>(stream), device);
}

template <typename T>
void ideal_cuda(uintptr_t train, std::array<int64_t, 2> tshape, uintptr_t query, std::array<int64_t, 2> qshape,
                const py::array& a, const py::array& inv_2b2, const py::array& grp_img_ptr, const py::array& grp_img,
                const py::array& group_of_b, uintptr_t out, uintptr_t arg_key, uintptr_t arg_share, uintptr_t stream,
                int device) {
  IdealScoreArgs<T> A;
  A.train = dev<const T>(train);
  A.N = tshape[0]; A.D = tshape[1];
  A.query = dev<const T>(query);
  A.B = qshape[0];
  if (qshape[1] != A.D) throw std::invalid_argument("query and train differ in size");
  fill_checked_groups(A, a, inv_2b2, grp_img_ptr, grp_img, group_of_b);
  set_outputs<T>(A, out, arg_key, arg_share);
  py::gil_scoped_release nogil;
  ideal_score_cuda<T>(A, reinterpret_cast<void*>(stream), device);
}

}  // namespace

void register_cuda(py::module_& m) {
  m.def(
      "patch_softmax_cuda",
      [](bool is_double, uintptr_t train, std::array<int64_t, 4> tshape, uintptr_t query, std::array<int64_t, 4> qshape,
         int k, int query_pad, int key_pad, const py::array& a, const py::array& inv_2b2, const py::array& cls_qpix_ptr,
         const py::array& cls_qpix, const py::array& cls_kpos_ptr, const py::array& cls_kpos,
         const py::array& grp_img_ptr, const py::array& grp_img, const py::array& group_of_b, uintptr_t out,
         uintptr_t arg_key, uintptr_t arg_share, uintptr_t stream, int device) {
        (is_double ? local_cuda<double> : local_cuda<float>)(train, tshape, query, qshape, k, query_pad, key_pad, a,
                                                            inv_2b2, cls_qpix_ptr, cls_qpix, cls_kpos_ptr, cls_kpos,
                                                            grp_img_ptr, grp_img, group_of_b, out, arg_key, arg_share,
                                                            stream, device);
      },
      "Streaming patch softmax on the GPU: device addresses + shapes, host index arrays, a stream handle.");
  m.def(
      "ideal_score_cuda",
      [](bool is_double, uintptr_t train, std::array<int64_t, 2> tshape, uintptr_t query, std::array<int64_t, 2> qshape,
         const py::array& a, const py::array& inv_2b2, const py::array& grp_img_ptr, const py::array& grp_img,
         const py::array& group_of_b, uintptr_t out, uintptr_t arg_key, uintptr_t arg_share, uintptr_t stream,
         int device) {
        (is_double ? ideal_cuda<double> : ideal_cuda<float>)(train, tshape, query, qshape, a, inv_2b2, grp_img_ptr,
                                                            grp_img, group_of_b, out, arg_key, arg_share, stream, device);
      },
      "Ideal score machine on the GPU: device addresses + shapes, host index arrays, a stream handle.");
}

}  // namespace patchmosaic
