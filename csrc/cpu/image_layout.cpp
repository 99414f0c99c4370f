// channels_last <-> NCHW copies of the CPU image kernels: see cpu/image_layout.h.
#include "cpu/image_layout.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "common/layout.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {
namespace {

// Pixels per task: a (C x kPixels) block is a few hundred KB at most, and a batch of one image
// still splits over the threads.
constexpr int64_t kPixels = 256;

struct Image {
  int64_t n, c, hw;
};
Image image_of(const at::Tensor& t) {
  const bool batched = t.dim() == 4;
  return {batched ? t.size(0) : 1, t.size(batched ? 1 : 0),
          t.size(batched ? 2 : 1) * t.size(batched ? 3 : 2)};
}

// dst image = src image transposed, each image an (rows x cols) matrix, in blocks of kPixels
// along `pixels_are_rows ? rows : cols`.
void transpose_images(const float* src, float* dst, const Image& im, bool pixels_are_rows) {
  const int64_t blocks = (im.hw + kPixels - 1) / kPixels;
  at::parallel_for(0, im.n * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks, p0 = b % blocks * kPixels;
      const int64_t np = std::min(kPixels, im.hw - p0);
      const float* s = src + n * im.c * im.hw;
      float* d = dst + n * im.c * im.hw;
      if (pixels_are_rows)  // channels_last (hw x c) -> NCHW (c x hw)
        conv2d::transpose<float>(np, im.c, s + p0 * im.c, im.c, d + p0, im.hw, nullptr);
      else  // NCHW (c x hw) -> channels_last (hw x c)
        conv2d::transpose<float>(im.c, np, s + p0, im.hw, d + p0 * im.c, im.c, nullptr);
    }
  });
}

}  // namespace

bool dense_channels_last(const at::Tensor& t) {
  if ((t.dim() != 3 && t.dim() != 4) || t.is_contiguous()) return false;
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  // (C, H, W) with strides (1, W * C, C): the batch of one's channels_last order
  const int64_t c = t.size(0), h = t.size(1), w = t.size(2);
  return (c == 1 || t.stride(0) == 1) && (h == 1 || t.stride(1) == w * c) &&
         (w == 1 || t.stride(2) == c);
}

at::Tensor contiguous_image(const at::Tensor& t) {
  if (t.scalar_type() != at::kFloat || !dense_channels_last(t) || t.numel() == 0)
    return t.contiguous();
  at::Tensor out = empty_of(t.sizes(), t.options());
  transpose_images(t.const_data_ptr<float>(), out.mutable_data_ptr<float>(), image_of(t),
                   /*pixels_are_rows=*/true);
  return out;
}

at::Tensor as_image_layout(const at::Tensor& t, bool channels_last) {
  if (!channels_last || t.scalar_type() != at::kFloat || t.numel() == 0)
    return pyengine::as_image_layout(t, channels_last);
  at::Tensor out = empty_image<int64_t>(t.sizes(), true, t.options());
  if (out.is_contiguous()) {  // one channel or 1x1 planes: the same order, other strides
    out.copy_(t);
    return out;
  }
  transpose_images(t.const_data_ptr<float>(), out.mutable_data_ptr<float>(), image_of(t),
                   /*pixels_are_rows=*/false);
  return out;
}

}  // namespace cpu
}  // namespace pyengine
