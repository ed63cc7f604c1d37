// plan.hpp -- work items of a local-machine call and the fixed order in which their results merge.
//
// Rows of a call are (query image, query pixel) pairs, taken per (image group g, pixel class c): row r of
// the pair is query image qg.image(g, r / npix) at the class's pixel r % npix. Keys of the pair: key j is
// training image grp_img[grp_img_ptr[g] + j / npos] centred at cls_kpos[cls_kpos_ptr[c] + j % npos].
// A work item is a block of rows against a range of keys; the items of one row block split its keys
// into consecutive ranges, and each writes its partial softmax states (or gradient sums) to its own
// rows of a partial buffer ("slots"), merged afterwards in item order. The split depends on the sizes
// of the call only, never on the number of threads, so results are the same bits on any machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "contract.hpp"

namespace patchmosaic {

// Query images of each group, in ascending order (CSR).
struct QueryGroups {
  std::vector<int64_t> ptr;
  std::vector<int32_t> b;
  int64_t count(int64_t g) const { return ptr[g + 1] - ptr[g]; }
  int64_t image(int64_t g, int64_t i) const { return b[ptr[g] + i]; }
};

inline QueryGroups queries_by_group(const int32_t* group_of_b, int64_t B, int64_t n_groups) {
  QueryGroups q;
  q.ptr.assign(n_groups + 1, 0);
  for (int64_t b = 0; b < B; ++b) q.ptr[group_of_b[b] + 1]++;
  for (int64_t g = 0; g < n_groups; ++g) q.ptr[g + 1] += q.ptr[g];
  q.b.resize(B);
  std::vector<int64_t> fill(q.ptr.begin(), q.ptr.end() - 1);
  for (int64_t b = 0; b < B; ++b) q.b[fill[group_of_b[b]]++] = static_cast<int32_t>(b);
  return q;
}

struct WorkItem {
  int64_t g, c, row0, row1, k0, k1;
  int64_t slot;  // first partial row of this item
};

struct RowBlock {
  int64_t g, c, row0, row1;
  int64_t item0, item1;  // its items (key ranges, in order)
};

struct Plan {
  std::vector<WorkItem> items;
  std::vector<RowBlock> blocks;
  int64_t slots = 0;
};

// Rows and keys of the (group, class) pair.
template <typename View>
inline int64_t pair_rows(const View& A, const QueryGroups& qg, int64_t g, int64_t c) {
  return qg.count(g) * (A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c]);
}
template <typename View>
inline int64_t pair_keys(const View& A, int64_t g, int64_t c) {
  return (A.grp_img_ptr[g + 1] - A.grp_img_ptr[g]) * (A.cls_kpos_ptr[c + 1] - A.cls_kpos_ptr[c]);
}

// Items in the order (group, class, row block, key range). keys_per_item(rows, nkeys) gives the length of
// every key range of a row block (the last one may be shorter).
template <typename View, typename KeysPerItem>
Plan plan_items(const View& A, const QueryGroups& qg, int64_t row_block, KeysPerItem keys_per_item) {
  Plan p;
  for (int64_t g = 0; g < A.n_groups; ++g) {
    if (qg.count(g) == 0) continue;
    for (int64_t c = 0; c < A.n_classes; ++c) {
      const int64_t nrows = pair_rows(A, qg, g, c);
      if (nrows == 0) continue;
      const int64_t nkeys = pair_keys(A, g, c);
      for (int64_t r0 = 0; r0 < nrows; r0 += row_block) {
        const int64_t r1 = std::min(nrows, r0 + row_block);
        const int64_t per = std::max<int64_t>(1, keys_per_item(r1 - r0, nkeys));
        RowBlock rb{g, c, r0, r1, static_cast<int64_t>(p.items.size()), 0};
        for (int64_t k0 = 0; k0 < nkeys; k0 += per) {
          p.items.push_back({g, c, r0, r1, k0, std::min(nkeys, k0 + per), p.slots});
          p.slots += r1 - r0;
        }
        rb.item1 = static_cast<int64_t>(p.items.size());
        p.blocks.push_back(rb);
      }
    }
  }
  return p;
}

// Query image and pixel of row r of the (g, c) pair.
template <typename View>
inline int64_t row_image(const View& A, const QueryGroups& qg, int64_t g, int64_t c, int64_t r) {
  const int64_t npix = A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c];
  return qg.image(g, r / npix);
}
template <typename View>
inline int64_t row_pixel(const View& A, int64_t c, int64_t r) {
  const int64_t npix = A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c];
  return A.cls_qpix[A.cls_qpix_ptr[c] + r % npix];
}

}  // namespace patchmosaic
