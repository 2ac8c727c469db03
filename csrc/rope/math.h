// Per-element math of the 3D rotary embedding, shared by the CPU and CUDA kernels.
//
// The head dim D is split into axis chunks [0, dt), [dt, dt+dh), [dt+dh, dt+dh+dw) rotated by the
// t, h and w coordinate; channels from `rotated = dt+dh+dw` on pass through. A chunk of d channels
// holds d/2 rotation pairs; pair j of the chunk turns by pos * theta^(-2j/d). Pairs are numbered
// globally, chunk after chunk (pair p of the head = pair p - pair_start[a] of chunk a), so each
// token needs `rotated / 2` cos/sin values, reused by every head of q and k.
//   interleaved:     pair j of a chunk starting at s is channels (s + 2j, s + 2j + 1), so global
//                    pair p is channels (2p, 2p + 1).
//   not interleaved: pair j is channels (s + j, s + j + d/2) ("rotate_half" pairing).
// A pair (a, b) at angle phi becomes (a cos - b sin, a sin + b cos); the inverse rotation (the
// backward pass) uses -phi, i.e. flips the sign of sin.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace vdit {

struct RopeChannels {
  int dims[3];        // channels per axis chunk, each even
  int start[3];       // first channel of each chunk
  int pair_start[3];  // first global pair of each chunk
  int rotated;        // dt + dh + dw
  int head_dim;       // D
  bool interleaved;
};

inline RopeChannels make_rope_channels(int dt, int dh, int dw, int head_dim, bool interleaved) {
  RopeChannels L;
  L.dims[0] = dt;
  L.dims[1] = dh;
  L.dims[2] = dw;
  L.start[0] = 0;
  L.start[1] = dt;
  L.start[2] = dt + dh;
  L.pair_start[0] = 0;
  L.pair_start[1] = dt / 2;
  L.pair_start[2] = (dt + dh) / 2;
  L.rotated = dt + dh + dw;
  L.head_dim = head_dim;
  L.interleaved = interleaved;
  return L;
}

// Axis (0 = t, 1 = h, 2 = w) of global pair p < rotated / 2.
VDIT_HOST_DEVICE int rope_pair_axis(const RopeChannels& L, int p) {
  return p >= L.pair_start[2] ? 2 : (p >= L.pair_start[1] ? 1 : 0);
}

// Inverse frequency theta^(-2j/d) of global pair p, in double so that float and double kernels
// round it exactly like the reference (which builds it in float64 and casts).
VDIT_HOST_DEVICE double rope_inv_freq(const RopeChannels& L, double log_theta, int p) {
  const int a = rope_pair_axis(L, p);
  const int j = p - L.pair_start[a];
  return exp(-(2.0 * j / L.dims[a]) * log_theta);
}

// Where channel c < rotated sits: its global pair, the partner channel of the pair, and whether
// c is the pair's first element (a) or second (b).
struct RopeSlot {
  int pair;
  int partner;
  bool first;
};

VDIT_HOST_DEVICE RopeSlot rope_slot(const RopeChannels& L, int c) {
  RopeSlot s;
  if (L.interleaved) {
    s.pair = c >> 1;
    s.first = (c & 1) == 0;
    s.partner = c ^ 1;
    return s;
  }
  const int a = c >= L.start[2] ? 2 : (c >= L.start[1] ? 1 : 0);
  const int half = L.dims[a] >> 1;
  const int i = c - L.start[a];
  s.first = i < half;
  s.pair = L.pair_start[a] + (s.first ? i : i - half);
  s.partner = s.first ? c + half : c - half;
  return s;
}

// Rotated value of channel c given its own value x, its partner's value y and the pair's
// cos / sin: first element a cos - b sin, second b cos + a sin (x is the element, y its partner).
template <typename A>
VDIT_HOST_DEVICE A rope_rotate(A x, A y, A cos_v, A sin_v, bool first) {
  return first ? x * cos_v - y * sin_v : x * cos_v + y * sin_v;
}

// sin and cos of a float angle: Cody-Waite reduction by pi/2 (a 3-term split of pi/2 whose products
// with the quadrant count are exact for |x| < 2^16 * pi/2 ~ 1e5) and the classic single-precision
// minimax polynomials on [-pi/4, pi/4], then the quadrant's signs and swap. Branch-free plain
// arithmetic: no libm / libdevice call, no slow-path stack frame on the GPU, and the CPU tests run
// exactly the math the CUDA kernel (and the Triton kernel's copy of it) runs. Measured absolute
// error vs float64: 9e-8 for |x| < 1e4, 1e-6 for |x| < 1e5 (fp32 libm: 7e-8); it grows beyond
// (3e-2 at 1e6), so coordinates must stay below 1e5 (the first pair turns by pos * 1).
VDIT_HOST_DEVICE void rope_sincos(float x, float* s_out, float* c_out) {
  const float q = floorf(x * 0.636619772f + 0.5f);
  const float r = ((x - q * 1.5703125f) - q * 4.837512969970703125e-4f) - q * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float s = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * r2 +
                  r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const int j = static_cast<int>(q);
  const float sv = (j & 1) ? c : s;
  const float cv = (j & 1) ? s : c;
  *s_out = (j & 2) ? -sv : sv;
  *c_out = ((j + 1) & 2) ? -cv : cv;
}

// Double angles (float64 tensors) use the precise library functions.
VDIT_HOST_DEVICE void rope_sincos(double x, double* s_out, double* c_out) {
  *s_out = sin(x);
  *c_out = cos(x);
}

// Angle of a pair from its axis coordinate, in the compute type A (float or double). The position
// is converted to A first, as the reference does.
template <typename A, typename P>
VDIT_HOST_DEVICE A rope_angle(P pos, double inv_freq) {
  return static_cast<A>(pos) * static_cast<A>(inv_freq);
}

// RMSNorm scale 1 / sqrt(mean(x^2) + eps) from the sum of squares over D channels.
template <typename A>
VDIT_HOST_DEVICE A rms_scale(A sum_squares, int D, A eps) {
  return A(1) / sqrt(sum_squares / A(D) + eps);
}

// Gradient of x for y = x * r * w with r = rms_scale(x), given g = dL/dy * w per channel
// (gx_hat), xh = x * r and dot = mean(g * xh): dL/dx = r * (g - xh * dot).
template <typename A>
VDIT_HOST_DEVICE A rms_norm_grad(A g, A xh, A r, A dot) {
  return r * (g - xh * dot);
}

}  // namespace vdit
