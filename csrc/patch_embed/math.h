// Per-sample metadata of the packed (varlen) patch embedding, shared by the CPU kernels and the
// Triton launcher (which builds the same table in Python).
//
// A list of B videos (C, Ti, Hi, Wi) is described by an int64 (B, kPackedMetaCols) table. Token
// rows (tt, hh) of all samples are numbered globally in sample order, so the tokens of any run of
// consecutive token rows are one contiguous chunk of the packed (total, D) output. Pixel index math
// is that of patchify.h (this file adds only the packing).
#pragma once

#include <cstdint>

#include "patchify/math.h"

namespace vdit {

enum PackedMetaCol : int {
  kMetaTokenOffset = 0,  // first packed token of the sample (cu_seqlens[i])
  kMetaT = 1,
  kMetaH = 2,
  kMetaW = 3,
  kMetaRowOffset = 4,    // first global token row of the sample
  kMetaVideoOffset = 5,  // first element of the sample in a flat concatenation of the videos
  kPackedMetaCols = 6,
};

// The patch geometry of sample `s` of a metadata table with C channels and patch (pt, ph, pw).
VDIT_HOST_DEVICE PatchGeometry packed_sample_geometry(const int64_t* meta, int64_t s, int64_t C, int64_t pt,
                                                      int64_t ph, int64_t pw) {
  const int64_t* row = meta + s * kPackedMetaCols;
  return PatchGeometry{C, row[kMetaT], row[kMetaH], row[kMetaW], pt, ph, pw};
}

}  // namespace vdit
