// bindings.cpp -- pybind11 module patchmosaic._core: buffers and sizes in, nothing of torch.
// The Python layer (backends/cpu.py) validates, converts and allocates; these checks only guard
// against a wrong call from that layer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "patch_softmax.hpp"
#include "py_buffers.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace patchmosaic;

namespace {

// The fields both kernels share: per-query coefficients, image groups, provenance outputs.
template <typename T, typename Args>
void fill_common(Args& A, const py::array& a, const py::array& inv_2b2, const py::array& grp_img_ptr,
                 const py::array& grp_img, const py::array& group_of_b, std::optional<py::array>& arg_key,
                 std::optional<py::array>& arg_share, int prov_ndim, int n_threads) {
  fill_groups(A, a, inv_2b2, grp_img_ptr, grp_img, group_of_b);
  if (arg_key) A.arg_key = ptr_of<int64_t>(*arg_key, "arg_key", prov_ndim, true);
  if (arg_share) A.arg_share = ptr_of<T>(*arg_share, "arg_share", prov_ndim, true);
  A.n_threads = n_threads;
}

// Training images, queries and patch geometry: the fields both patch kernels share.
template <typename T, typename Args>
void fill_patches(Args& A, const py::array& train, const py::array& query, int k, int query_pad, int key_pad) {
  A.train = ptr_of<T>(train, "train", 4);
  A.N = train.shape(0); A.C = static_cast<int>(train.shape(1));
  A.H = static_cast<int>(train.shape(2)); A.W = static_cast<int>(train.shape(3));
  A.query = ptr_of<T>(query, "query", 4);
  A.B = query.shape(0); A.Hq = static_cast<int>(query.shape(2)); A.Wq = static_cast<int>(query.shape(3));
  if (query.shape(1) != A.C) throw std::invalid_argument("query and train differ in channels");
  A.k = k; A.query_pad = query_pad; A.key_pad = key_pad;
}

template <typename T>
void patch_softmax_impl(const py::array& train, const py::array& query, int k, int query_pad, int key_pad,
                        const py::array& a, const py::array& inv_2b2, const py::array& cls_qpix_ptr,
                        const py::array& cls_qpix, const py::array& cls_kpos_ptr, const py::array& cls_kpos,
                        const py::array& grp_img_ptr, const py::array& grp_img, const py::array& group_of_b,
                        const py::array& out, std::optional<py::array> arg_key, std::optional<py::array> arg_share,
                        int n_threads) {
  PatchSoftmaxArgs<T> A;
  fill_patches<T>(A, train, query, k, query_pad, key_pad);
  A.cls_qpix_ptr = ptr_of<int64_t>(cls_qpix_ptr, "cls_qpix_ptr", 1);
  A.n_classes = cls_qpix_ptr.shape(0) - 1;
  A.cls_qpix = ptr_of<int32_t>(cls_qpix, "cls_qpix", 1);
  A.cls_kpos_ptr = ptr_of<int64_t>(cls_kpos_ptr, "cls_kpos_ptr", 1);
  A.cls_kpos = ptr_of<int32_t>(cls_kpos, "cls_kpos", 1);
  A.out = ptr_of<T>(out, "out", 4, true);
  fill_common<T>(A, a, inv_2b2, grp_img_ptr, grp_img, group_of_b, arg_key, arg_share, 3, n_threads);
  if (cls_kpos_ptr.shape(0) != cls_qpix_ptr.shape(0)) throw std::invalid_argument("class pointer arrays differ in length");
  py::gil_scoped_release nogil;
  patch_softmax_cpu<T>(A);
}

template <typename T>
void ideal_score_impl(const py::array& train, const py::array& query, const py::array& a, const py::array& inv_2b2,
                      const py::array& grp_img_ptr, const py::array& grp_img, const py::array& group_of_b,
                      const py::array& out, std::optional<py::array> arg_key, std::optional<py::array> arg_share,
                      int n_threads) {
  IdealScoreArgs<T> A;
  A.train = ptr_of<T>(train, "train", 2);
  A.N = train.shape(0); A.D = train.shape(1);
  A.query = ptr_of<T>(query, "query", 2);
  A.B = query.shape(0);
  if (query.shape(1) != A.D) throw std::invalid_argument("query and train differ in size");
  A.out = ptr_of<T>(out, "out", 2, true);
  fill_common<T>(A, a, inv_2b2, grp_img_ptr, grp_img, group_of_b, arg_key, arg_share, 1, n_threads);
  py::gil_scoped_release nogil;
  ideal_score_cpu<T>(A);
}

template <typename T>
void candidate_softmax_impl(const py::array& train, const py::array& query, int k, int query_pad, int key_pad,
                            const py::array& a, const py::array& inv_2b2, const py::array& pix,
                            const py::array& cand, const py::array& out, const py::array& top_logit,
                            const py::array& last_logit, const py::array& sum_rel, std::optional<py::array> arg_key,
                            std::optional<py::array> arg_share, std::optional<py::array> count, int n_threads) {
  CandidateSoftmaxArgs<T> A;
  fill_patches<T>(A, train, query, k, query_pad, key_pad);
  A.a = ptr_of<double>(a, "a", 1);
  A.inv_2b2 = ptr_of<double>(inv_2b2, "inv_2b2", 1);
  if (a.shape(0) != A.B || inv_2b2.shape(0) != A.B) throw std::invalid_argument("a, inv_2b2: one entry per query image");
  A.pix = ptr_of<int64_t>(pix, "pix", 1);
  A.P = pix.shape(0);
  A.cand = ptr_of<int64_t>(cand, "cand", 2);
  if (cand.shape(0) != A.P) throw std::invalid_argument("cand must have one row per listed pixel");
  A.m = static_cast<int>(cand.shape(1));
  A.out = ptr_of<T>(out, "out", 4, true);
  A.top_logit = ptr_of<double>(top_logit, "top_logit", 1, true);
  A.last_logit = ptr_of<double>(last_logit, "last_logit", 1, true);
  A.sum_rel = ptr_of<double>(sum_rel, "sum_rel", 1, true);
  if (top_logit.shape(0) != A.P || last_logit.shape(0) != A.P || sum_rel.shape(0) != A.P)
    throw std::invalid_argument("top_logit, last_logit, sum_rel: one entry per listed pixel");
  if (arg_key) A.arg_key = ptr_of<int64_t>(*arg_key, "arg_key", 1, true);
  if (arg_share) A.arg_share = ptr_of<T>(*arg_share, "arg_share", 1, true);
  if (count) {
    A.count = ptr_of<double>(*count, "count", 2);
    if (count->shape(0) != A.P || count->shape(1) != A.m) throw std::invalid_argument("count must have the shape of cand");
    for (int64_t e = 0; e < A.P * A.m; ++e)
      if (A.cand[e] >= 0 && !(A.count[e] >= 1.0)) throw std::invalid_argument("count holds a multiplicity below 1 (or NaN)");
  }
  const int64_t npix = A.B * A.Hq * A.Wq, nkey = A.N * A.H * A.W;
  for (int64_t p = 0; p < A.P; ++p)
    if (A.pix[p] < 0 || A.pix[p] >= npix) throw std::invalid_argument("pix holds an index outside the query");
  for (int64_t e = 0; e < A.P * A.m; ++e)
    if (A.cand[e] >= nkey) throw std::invalid_argument("cand holds a key index outside the training set");
  A.n_threads = n_threads;
  py::gil_scoped_release nogil;
  candidate_softmax_cpu<T>(A);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "patchmosaic compiled core: streaming patch-softmax kernels (CPU)";
  m.def(
      "patch_softmax",
      [](const py::array& train, const py::array& query, int k, int query_pad, int key_pad, const py::array& a,
         const py::array& inv_2b2, const py::array& cls_qpix_ptr, const py::array& cls_qpix,
         const py::array& cls_kpos_ptr, const py::array& cls_kpos, const py::array& grp_img_ptr,
         const py::array& grp_img, const py::array& group_of_b, const py::array& out,
         std::optional<py::array> arg_key, std::optional<py::array> arg_share, int n_threads) {
        if (py::isinstance<py::array_t<float>>(train))
          patch_softmax_impl<float>(train, query, k, query_pad, key_pad, a, inv_2b2, cls_qpix_ptr, cls_qpix,
                                    cls_kpos_ptr, cls_kpos, grp_img_ptr, grp_img, group_of_b, out, arg_key,
                                    arg_share, n_threads);
        else if (py::isinstance<py::array_t<double>>(train))
          patch_softmax_impl<double>(train, query, k, query_pad, key_pad, a, inv_2b2, cls_qpix_ptr, cls_qpix,
                                     cls_kpos_ptr, cls_kpos, grp_img_ptr, grp_img, group_of_b, out, arg_key,
                                     arg_share, n_threads);
        else
          throw std::invalid_argument("train: expected float32 or float64");
      },
      py::arg("train"), py::arg("query"), py::arg("k"), py::arg("query_pad"), py::arg("key_pad"), py::arg("a"),
      py::arg("inv_2b2"), py::arg("cls_qpix_ptr"), py::arg("cls_qpix"), py::arg("cls_kpos_ptr"),
      py::arg("cls_kpos"), py::arg("grp_img_ptr"), py::arg("grp_img"), py::arg("group_of_b"), py::arg("out"),
      py::arg("arg_key") = py::none(), py::arg("arg_share") = py::none(), py::arg("n_threads") = 0,
      "Streaming softmax over key patches for every query pixel class (see cpp/patch_softmax.hpp).");
  m.def(
      "ideal_score",
      [](const py::array& train, const py::array& query, const py::array& a, const py::array& inv_2b2,
         const py::array& grp_img_ptr, const py::array& grp_img, const py::array& group_of_b, const py::array& out,
         std::optional<py::array> arg_key, std::optional<py::array> arg_share, int n_threads) {
        if (py::isinstance<py::array_t<float>>(train))
          ideal_score_impl<float>(train, query, a, inv_2b2, grp_img_ptr, grp_img, group_of_b, out, arg_key,
                                  arg_share, n_threads);
        else if (py::isinstance<py::array_t<double>>(train))
          ideal_score_impl<double>(train, query, a, inv_2b2, grp_img_ptr, grp_img, group_of_b, out, arg_key,
                                   arg_share, n_threads);
        else
          throw std::invalid_argument("train: expected float32 or float64");
      },
      py::arg("train"), py::arg("query"), py::arg("a"), py::arg("inv_2b2"), py::arg("grp_img_ptr"),
      py::arg("grp_img"), py::arg("group_of_b"), py::arg("out"), py::arg("arg_key") = py::none(),
      py::arg("arg_share") = py::none(), py::arg("n_threads") = 0,
      "Streaming softmax over whole training images (the ideal score machine).");
  m.def(
      "candidate_softmax",
      [](const py::array& train, const py::array& query, int k, int query_pad, int key_pad, const py::array& a,
         const py::array& inv_2b2, const py::array& pix, const py::array& cand, const py::array& out,
         const py::array& top_logit, const py::array& last_logit, const py::array& sum_rel,
         std::optional<py::array> arg_key, std::optional<py::array> arg_share, std::optional<py::array> count,
         int n_threads) {
        if (py::isinstance<py::array_t<float>>(train))
          candidate_softmax_impl<float>(train, query, k, query_pad, key_pad, a, inv_2b2, pix, cand, out, top_logit,
                                        last_logit, sum_rel, arg_key, arg_share, count, n_threads);
        else if (py::isinstance<py::array_t<double>>(train))
          candidate_softmax_impl<double>(train, query, k, query_pad, key_pad, a, inv_2b2, pix, cand, out, top_logit,
                                         last_logit, sum_rel, arg_key, arg_share, count, n_threads);
        else
          throw std::invalid_argument("train: expected float32 or float64");
      },
      py::arg("train"), py::arg("query"), py::arg("k"), py::arg("query_pad"), py::arg("key_pad"), py::arg("a"),
      py::arg("inv_2b2"), py::arg("pix"), py::arg("cand"), py::arg("out"), py::arg("top_logit"),
      py::arg("last_logit"), py::arg("sum_rel"), py::arg("arg_key") = py::none(), py::arg("arg_share") = py::none(),
      py::arg("count") = py::none(), py::arg("n_threads") = 0,
      "Exact softmax over a candidate key list per listed query pixel (see cpp/patch_softmax.hpp).");
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
#ifdef PATCHMOSAIC_WITH_CUDA
  m.attr("has_cuda") = true;
  register_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
}
