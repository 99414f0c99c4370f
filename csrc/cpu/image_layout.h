#pragma once
// channels_last <-> NCHW copies of the CPU image kernels that compute in contiguous NCHW only
// (max_pool2d, the fused block, conv2d's im2col, direct and batch-innermost algorithms; its
// Winograd, implicit-GEMM and pointwise kernels take channels_last as it is: cpu/conv2d.cpp): a
// channels_last input is copied into NCHW on the way in and each result into channels_last on
// the way out (common/layout.h says when torch's would be).
// float32 images go through cpu/transpose.h's register transposes, (H*W) x C <-> C x (H*W) per
// image, blocks of pixels spread over the threads; torch's copy_ between the two layouts ran at
// a quarter of a plain copy's speed (8 x 64 x 56 x 56: 1.06-1.27 ms against 0.30), which made
// a channels_last 64->64 3x3 convolution 1.2x torch's time. Other dtypes keep torch's copy.
#include <ATen/core/Tensor.h>

namespace pyengine {
namespace cpu {

// Whether t (4-D, or 3-D unbatched) is dense in channels_last order and not also contiguous
// (one channel or 1x1 planes are both: nothing to move).
bool dense_channels_last(const at::Tensor& t);

// `t` as contiguous NCHW (or CHW): t.contiguous(), by the transposes where t is a dense
// channels_last float32 image.
at::Tensor contiguous_image(const at::Tensor& t);

// `t`, a contiguous (N, C, H, W) or (C, H, W) result as the kernels write it, in torch's layout:
// itself, or a channels_last copy (common/layout.h's as_image_layout, by the transposes).
at::Tensor as_image_layout(const at::Tensor& t, bool channels_last);

}  // namespace cpu
}  // namespace pyengine
