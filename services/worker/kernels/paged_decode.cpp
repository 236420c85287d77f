// Decode attention over a paged KV cache on CPU, reading each sequence's K/V blocks where they lie.
//
// One query token per sequence (a decode step), every query head of a KV head together, ragged lengths, an
// optional sliding window. Built by services/worker/native.py with the system compiler (-O3 -march=native
// -fopenmp) and called through ctypes; torch's own libgomp runs the threads (same soname, already loaded).
// Why not gather + SDPA: the gather copies every block of every decode in every layer, and torch's CPU flash
// kernel pays a tile set-up per (sequence, head) that outweighs the work of one query token.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;  // floats per vector: one AVX-512 register, two AVX2 ones
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Wide __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t Narrow __attribute__((vector_size(kLanes * sizeof(uint16_t))));
constexpr int kMaxChunks = 16;  // head dims up to 256

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec load(const uint16_t* p) {  // bfloat16: the high half of a float32
  Narrow half;
  std::memcpy(&half, p, sizeof half);
  Wide bits = __builtin_convertvector(half, Wide) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline float sum(Vec v) {
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

inline void store(float x, float* out) { *out = x; }

inline void store(float x, uint16_t* out) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x40u);  // a quiet NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// One sequence's query heads of one KV head over its keys [first, length): out = softmax(q K^T * scale) V.
// `query` holds the group's queries pre-scaled, `scores` room for group * (length - first) floats.
template <typename T>
void attend_one(const Vec* query, const T* k_cache, const T* v_cache, const int64_t* table, int64_t first,
                int64_t length, int64_t group, int64_t chunks, int64_t block_size, int64_t token_stride,
                float* scores, Vec* acc, T* out) {
  const int64_t count = length - first;
  Vec key[kMaxChunks];
  for (int64_t t = first; t < length;) {  // block by block: no division per key
    const int64_t offset = t % block_size, end = std::min(length, t - offset + block_size);
    const T* row = k_cache + (table[t / block_size] * block_size + offset) * token_stride;
    for (; t < end; ++t, row += token_stride) {
      for (int64_t c = 0; c < chunks; ++c) key[c] = load(row + c * kLanes);
      for (int64_t j = 0; j < group; ++j) {
        Vec dot = query[j * chunks] * key[0];
        for (int64_t c = 1; c < chunks; ++c) dot += query[j * chunks + c] * key[c];
        scores[j * count + (t - first)] = sum(dot);
      }
    }
  }
  float totals[64];
  for (int64_t j = 0; j < group; ++j) {
    float* row = scores + j * count;
    const float top = *std::max_element(row, row + count);
    float total = 0.f;
    for (int64_t i = 0; i < count; ++i) total += (row[i] = std::exp(row[i] - top));
    totals[j] = total;
  }
  for (int64_t i = 0; i < group * chunks; ++i) acc[i] = Vec{};
  for (int64_t t = first; t < length;) {
    const int64_t offset = t % block_size, end = std::min(length, t - offset + block_size);
    const T* row = v_cache + (table[t / block_size] * block_size + offset) * token_stride;
    for (; t < end; ++t, row += token_stride) {
      for (int64_t c = 0; c < chunks; ++c) key[c] = load(row + c * kLanes);
      for (int64_t j = 0; j < group; ++j) {
        const float p = scores[j * count + (t - first)];
        for (int64_t c = 0; c < chunks; ++c) acc[j * chunks + c] += p * key[c];
      }
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    const float inverse = 1.f / totals[j];
    for (int64_t c = 0; c < chunks; ++c)
      for (int i = 0; i < kLanes; ++i) store(acc[j * chunks + c][i] * inverse, out + (j * chunks + c) * kLanes + i);
  }
}

// q, out [num_seqs, heads, dim]; caches [num_blocks, block_size, kv_heads, dim]; tables [num_seqs, width];
// lengths [num_seqs] (keys per sequence, its query sitting at the last); window 0: none.
// Returns 0, or -1 for a shape it does not take (dim not a multiple of 16 up to 256, over 64 heads per KV head).
template <typename T>
int decode(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lengths, T* out,
           int64_t num_seqs, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, int64_t width,
           float scale, int64_t window) {
  const int64_t group = heads / kv_heads, chunks = dim / kLanes;
  if (dim % kLanes != 0 || chunks > kMaxChunks || group > 64) return -1;
#pragma omp parallel
  {
    std::vector<Vec> query(group * chunks), acc(group * chunks);
    std::vector<float> scores;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t length = lengths[s];
        const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
        const T* q_head = q + (s * heads + h * group) * dim;
        for (int64_t i = 0; i < group * chunks; ++i) query[i] = load(q_head + i * kLanes) * scale;
        scores.resize(group * (length - first));
        attend_one(query.data(), k_cache + h * dim, v_cache + h * dim, tables + s * width, first, length, group,
                   chunks, block_size, kv_heads * dim, scores.data(), acc.data(), out + (s * heads + h * group) * dim);
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

int paged_decode_f32(const float* q, const float* k_cache, const float* v_cache, const int64_t* tables,
                      const int64_t* lengths, float* out, int64_t num_seqs, int64_t heads, int64_t kv_heads,
                      int64_t dim, int64_t block_size, int64_t width, float scale, int64_t window) {
  return decode(q, k_cache, v_cache, tables, lengths, out, num_seqs, heads, kv_heads, dim, block_size, width, scale, window);
}

int paged_decode_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* tables,
                       const int64_t* lengths, uint16_t* out, int64_t num_seqs, int64_t heads, int64_t kv_heads,
                       int64_t dim, int64_t block_size, int64_t width, float scale, int64_t window) {
  return decode(q, k_cache, v_cache, tables, lengths, out, num_seqs, heads, kv_heads, dim, block_size, width, scale, window);
}

}  // extern "C"
