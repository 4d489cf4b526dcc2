// Paged decode attention: one query token per request over its KV blocks, read in place.
//
// Plain C++ (no torch headers), like kernels.h: paged_decode.cpp is compiled for AVX2 + FMA through
// `#pragma GCC target`, paged_decode_ops.cpp (checks, threads, torch registration) for the baseline.
//
// A cache is (num_blocks, block_size, Hkv, D) of fp32, bf16 or int8 (int8: one fp32 scale per token
// and head, (num_blocks, block_size, Hkv)). Request r's key j (0-based position in its own key space)
// sits in block table[r * table_width + j / block_size] at offset j % block_size. The keys request r
// sees are [0, min(sinks, lo[r])) (attention sinks, scored with q_sink when given) and [lo[r], hi[r]).
#pragma once

#include <cstdint>

namespace leanfm_kernels {

enum KVKind : int { kKVFloat32 = 0, kKVBFloat16 = 1, kKVInt8 = 2 };

struct DecodeArgs {
  const float* q;        // (R, H, D) fp32, already multiplied by the softmax scale
  const float* q_sink;   // (R, H, D) like q, for the sink keys; nullptr = use q
  const void* k;         // cache data (kind below)
  const void* v;
  const float* k_scale;  // int8 only: (num_blocks * block_size * Hkv)
  const float* v_scale;
  int kind;
  const int64_t* table;  // (R, table_width) block ids
  int64_t table_width;
  const int64_t* lo;     // (R,) first key of the main range
  const int64_t* hi;     // (R,) one past the last key
  int64_t sinks;         // keys [0, min(sinks, lo)) are visible too
  int64_t H, Hkv, D, block_size;
  float softcap;         // <= 0: none; else s = softcap * tanh(s / softcap) (s already scaled)
  float* score;          // (num_blocks * block_size * Hkv) or nullptr: += attention probability of each
                         // visible key, summed over the query heads sharing its kv head (H2O)
};

// Largest query-heads-per-kv-head group the kernel handles (the caller falls back beyond).
constexpr int64_t kMaxGroup = 8;
constexpr int64_t kMaxHeadDim = 512;

// Attention of request r's query heads [h * G, (h + 1) * G) (G = H / Hkv) over the keys of its kv head
// h in the main range [k0, k1) (a part of [lo, hi) when split) and, if with_sinks, the sink keys.
// Writes the running max m[G], the sum l[G] of exp(s - m) and acc[G * D] = sum exp(s - m) v.
// With a.score set (call it unsplit), also adds every visible key's probability to a.score.
void paged_decode_task(const DecodeArgs& a, int64_t r, int64_t h, int64_t k0, int64_t k1,
                       bool with_sinks, float* m, float* l, float* acc);

// The attention of all R requests into out (R, H, D) fp32: at::parallel_for over (request, kv head)
// tasks, split over the keys when there are few tasks (paged_decode_ops.cpp, which defines it; the
// paged_decode operator and paged_decode_layer.cpp call it).
void paged_decode_run(const DecodeArgs& a, int64_t R, float* out);

}  // namespace leanfm_kernels
