// The TVM path: kernels from tvm_schedules (TensorIR, knobs swept per target by `sherry tune`), compiled
// to object files by tvm_schedules/build.py and linked in, called through their C ABI
// (__tvm_ffi_<name>) with no TVM runtime. Built only with -DSHERRY_TVM=ON (SHERRY_WITH_TVM);
// otherwise make_tvm_kernel always declines.
//
// Layouts (mirrored from tvm_schedules/layout.py): weights as a code byte per code, in tiles of 16
// rows (byte 4r + j of a quad = code j of row r), scale groups padded to whole quads; activation rows
// hold the int8 values from the shared quantize_group quad by quad in dword order (each group
// padded), then the float32 group scales and the int32 group sums.
// The sherry LUT formulation (tvm_schedules/lut.py) instead: weights as pair records of the hand-written
// kernel of the entry's ISA (1.25 bits per weight; AVX-512: 80 bytes per 32 columns, AVX2: 160 bytes per
// 64, one half of kernel_avx2.cc's chunk), blocks of up to 8 tiles interleaved with each group's float16
// scales, ordered as the hand-written AVX-512 kernel's: superblocks (a parallel step each, as few as the
// threads allow: lut_superblocks), K-chunks of about 4 KiB of tables, blocks, groups; activation rows
// hold the pairs' lookup tables, built by that hand-written kernel's own table builder
// (sherry_group_tables_avx512 / _avx2), then the float32 group scales. Its block
// functions (mx, mb) run the M = 1 loop nest per row (nothing is decoded to share), so compute() treats
// both formulations alike.
//
// Threads: a kernel's outer loop runs over row blocks (`lane_block` rows: tiles x 16) as a TVM
// `parallel` loop, which calls __TVMBackendParallelLaunch. row_tile() is one row block, so the op's own parallel tiles (on
// onnxruntime's threads) are whole blocks; compute() tells the launch hook, through a thread-local,
// which blocks to run, and the hook runs those tasks inline.
//
// Inside the op's parallel sections nothing allocates: prepare_row reorders each group in place, and
// compute writes blocks that its range cuts, or that an unaligned output cannot take, through one
// block on the stack. A generated function that returns an error makes compute throw, which the op
// catches inside the parallel body (kernel.h).
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>

#include "kernel.h"

namespace sherry {
namespace {
// What a forced tvm path says when there is no kernel for the weights (tools match this phrase).
constexpr const char* kNoKernel = "the library has no tuned TVM kernel for this shape that this CPU can run";
}  // namespace
}  // namespace sherry

#ifdef SHERRY_WITH_TVM

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <vector>

#include "dispatch.h"
#include "kernel_tvm_table.h"
#include "weight_buffer.h"

extern "C" {
// Weak data pointers the TVM objects call through (the TVM module loader normally fills them).
__attribute__((weak)) void* __TVMBackendParallelLaunch = nullptr;
__attribute__((weak)) void* __TVMBackendAllocWorkspace = nullptr;
__attribute__((weak)) void* __TVMBackendFreeWorkspace = nullptr;
}

namespace sherry {
namespace {

struct ParallelGroupEnv {
  void* sync_handle;
  int32_t num_task;
};
using ParallelLambda = int (*)(int task_id, ParallelGroupEnv* penv, void* cdata);

// The row blocks [first, last) of `count` that the current compute() wants; count < 0: all tasks.
struct TaskRange {
  int64_t first = 0, last = 0, count = -1;
};
thread_local TaskRange t_tasks;
thread_local std::string t_error;

int parallel_launch(ParallelLambda lambda, void* cdata, int num_task) {
  const TaskRange range = t_tasks;
  const int64_t count = range.count > 0 ? range.count : (num_task > 0 ? num_task : 1);
  ParallelGroupEnv env{nullptr, static_cast<int32_t>(count)};
  const int64_t first = range.count > 0 ? range.first : 0, last = range.count > 0 ? range.last : count;
  for (int64_t task = first; task < last; ++task)
    if (int rc = lambda(static_cast<int>(task), &env, cdata)) return rc;
  return 0;
}

void* alloc_workspace(int, int, uint64_t nbytes, int, int) {
  return std::aligned_alloc(64, (nbytes + 63) / 64 * 64);
}
int free_workspace(int, int, void* ptr) {
  std::free(ptr);
  return 0;
}

const bool hooks_installed = [] {
  __TVMBackendParallelLaunch = reinterpret_cast<void*>(&parallel_launch);
  __TVMBackendAllocWorkspace = reinterpret_cast<void*>(&alloc_workspace);
  __TVMBackendFreeWorkspace = reinterpret_cast<void*>(&free_workspace);
  return true;
}();

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct FreeAligned {
  void operator()(void* p) const noexcept { std::free(p); }
};
template <typename T>
using AlignedArray = std::unique_ptr<T[], FreeAligned>;

template <typename T>
AlignedArray<T> aligned_array(size_t count) {
  const size_t bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(count, 1) * sizeof(T)), 64));
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return AlignedArray<T>(static_cast<T*>(p));
}

// Geometry of the kernel layouts (layout.py Shape): tiles of 16 rows, a code byte per code, groups
// padded to whole quads (4 codes); `lane_block` is the rows of one parallel task (16 x tiles knob).
constexpr int64_t kTvmTile = 16;
// The largest lane_block: the design space's tiles per step are at most 8 (kernels.py).
constexpr int64_t kMaxLaneBlock = 8 * kTvmTile;
// The LUT formulation's superblocks (lut.py superblocks_for): the hand-written kernel's
// (superblock_blocks, dispatch.h) rounded up to a divisor of the blocks, and none over kMaxLutStepRows
// rows (a step the op cannot write in place goes through the stack). K-chunks: the most groups whose
// tables fill kLutChunkPairs pairs (4 KiB per row of A).
constexpr int64_t kMaxLutStepRows = 4096, kLutChunkPairs = 8;
constexpr int64_t kMaxStepRows = kMaxLutStepRows > kMaxLaneBlock ? kMaxLutStepRows : kMaxLaneBlock;

int64_t lut_superblocks(int64_t blocks, int64_t block_rows) {
  const int64_t step = superblock_blocks(blocks);
  int64_t chosen = 0, largest_fit = 1;
  for (int64_t d = 1; d <= blocks; ++d) {
    if (blocks % d != 0 || (d > 1 && d * block_rows > kMaxLutStepRows)) continue;
    largest_fit = d;
    if (!chosen && d >= step) chosen = d;
  }
  return blocks / (chosen ? chosen : largest_fit);
}

// The LUT formulation (lut.py LutShape, LUT_ISAS): 512 table bytes per pair and row of A; per pair and
// tile, the AVX-512 records hold two pieces of 16 columns in 80 bytes, the AVX2 ones 16 units (64
// columns) in 160 bytes.
constexpr int64_t kPairTableBytes = 512, kScaleBytes = 32;
constexpr int64_t kPairColsAvx512 = 32, kPairBytesAvx512 = 80, kPairColsAvx2 = 64, kPairBytesAvx2 = 160;

struct TvmLayout {
  Format format;
  Geometry g;
  int64_t lanes_per_code, quads_per_group, codes_per_group, padded_group, quads, codes, lane_block;
  int64_t weight_row_bytes, scale_offset, row_bytes;  // weight bytes per row of N: codes, or the LUT stream
  int64_t block_lane_block;  // rows of a parallel step of the block functions (mx, mb)
  bool lut = false, avx2_records = false;
  // lut only: superblocks (parallel steps) of step_blocks blocks, chunks of chunk_groups groups
  int64_t pair_bytes = 0, pairs_per_group = 0, block_tiles = 0, group_bytes = 0, superblocks = 0, step_blocks = 0,
          chunks = 0, chunk_groups = 0;

  // `lut_isa`: the ISA of a LUT entry's pair records (KernelPath::kAVX2 or kAVX512), kScalar for a plane entry
  TvmLayout(Format f, const Geometry& geometry, int64_t lb, int64_t block_lb, KernelPath lut_isa)
      : TvmLayout(f, geometry, lb) {
    block_lane_block = block_lb;
    if (lut_isa == KernelPath::kScalar) return;
    lut = true;
    avx2_records = lut_isa == KernelPath::kAVX2;
    const int64_t tiles = g.n / kTvmTile, pair_cols = avx2_records ? kPairColsAvx2 : kPairColsAvx512;
    pair_bytes = avx2_records ? kPairBytesAvx2 : kPairBytesAvx512;
    pairs_per_group = ceil_div(g.group_size, pair_cols);
    padded_group = pairs_per_group * pair_cols;
    block_tiles = tiles % 8 == 0 ? 8 : tiles % 4 == 0 ? 4 : tiles % 2 == 0 ? 2 : 1;
    group_bytes = block_tiles * (pairs_per_group * pair_bytes + kScaleBytes);
    weight_row_bytes = g.groups() * group_bytes / block_tiles / kTvmTile;
    const int64_t most_groups = std::max<int64_t>(1, kLutChunkPairs / pairs_per_group);
    for (int64_t d = 1; d <= most_groups; ++d)
      if (g.groups() % d == 0) chunk_groups = d;
    chunks = g.groups() / chunk_groups;
    const int64_t blocks = tiles / block_tiles;
    superblocks = lut_superblocks(blocks, block_tiles * kTvmTile);
    step_blocks = blocks / superblocks;
    lane_block = block_lane_block = step_blocks * block_tiles * kTvmTile;  // a superblock per parallel step
    scale_offset = g.groups() * pairs_per_group * kPairTableBytes;
    row_bytes = scale_offset + round_up(4 * g.groups(), kPairTableBytes);
  }

  TvmLayout(Format f, const Geometry& geometry, int64_t lb) : format(f), g(geometry), lane_block(lb) {
    lanes_per_code = f == Format::kTL2 ? 3 : 4;
    quads_per_group = ceil_div(g.group_size, 4 * lanes_per_code);
    codes_per_group = 4 * quads_per_group;
    padded_group = codes_per_group * lanes_per_code;
    quads = g.groups() * quads_per_group;
    codes = 4 * quads;
    weight_row_bytes = codes;
    scale_offset = round_up(g.groups() * padded_group, 64);
    row_bytes = scale_offset + round_up(8 * g.groups(), 64);
  }
};

// The 5-bit code of one Sherry block (docs/formats.md); all-zero padding blocks get code 0.
uint8_t sherry_code(const int8_t* lanes) {
  int zero = -1;
  int8_t nonzero[3] = {0, 0, 0};
  for (int p = 0, j = 0; p < 4; ++p) {
    if (lanes[p] == 0 && zero < 0) zero = p;
    else if (j < 3) nonzero[j++] = lanes[p];
  }
  if (zero < 0 || nonzero[0] == 0) return 0;
  return static_cast<uint8_t>(zero << 2 | (nonzero[1] != nonzero[0]) << 1 | (nonzero[2] != nonzero[0]) |
                              (nonzero[0] < 0) << 4);
}

uint8_t tl2_code(const int8_t* lanes) {
  const int v = 9 * lanes[0] + 3 * lanes[1] + lanes[2];
  return static_cast<uint8_t>((v < 0 ? -v : v) | (v < 0) << 4);
}

DLTensor tensor(void* data, DLDataType dtype, int64_t* shape) {
  DLTensor t{};
  t.data = data;
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = 2;
  t.dtype = dtype;
  t.shape = shape;
  return t;
}

class TvmKernel final : public MatMulKernel {
 public:
  TvmKernel(const PackedWeights& w, const TvmEntry& entry)
      : entry_(entry),
        layout_(w.format, w.geometry, entry.lane_block, entry.block_lane_block,
                entry.formulation == 1 ? static_cast<KernelPath>(entry.isa) : KernelPath::kScalar) {
    const Geometry& g = w.geometry;
    const auto bad_step = [&](int64_t rows) {
      return rows <= 0 || rows > kMaxLaneBlock || rows % kTvmTile != 0 || g.n % rows != 0;
    };
    if (bad_step(entry.lane_block) || bad_step(entry.block_lane_block) || entry.block_rows < 1 ||
        entry.chunk_rows < entry.block_rows || !entry.mx || !entry.mb)
      throw std::runtime_error("the TVM kernel table's entry (" + std::string(entry.target) + ") has " +
                               std::to_string(entry.lane_block) + " and " + std::to_string(entry.block_lane_block) +
                               " rows per parallel step for N=" + std::to_string(g.n) + " and calls of " +
                               std::to_string(entry.chunk_rows) + " and " + std::to_string(entry.block_rows) +
                               " rows of A: rebuild the library (make lib)");
    const TvmLayout& L = layout_;
    if (L.lut && (w.format != Format::kSherry || L.block_tiles * kTvmTile % entry.lane_block != 0 ||
                  L.block_tiles * kTvmTile % entry.block_lane_block != 0))
      throw std::runtime_error(std::string("the TVM kernel table's LUT entry (") + entry.target + ") does not fit " +
                               format_name(w.format) + " weights with N=" + std::to_string(g.n) +
                               ": rebuild the library (make lib)");
    const int64_t blocks = g.n / L.lane_block;
    // on huge pages with the other nodes' weights, as the hand-written kernels' (weight_buffer.h)
    const size_t weight_bytes = static_cast<size_t>(g.n * L.weight_row_bytes);
    weights_ = WeightBuffer(ceil_div(static_cast<int64_t>(weight_bytes), 64));
    std::memset(weights_.data(), 0, weights_.size());
    alpha_ = aligned_array<float>(L.lut ? 0 : static_cast<size_t>(g.n * g.groups()));  // lut: in the stream
    std::vector<int8_t> values(static_cast<size_t>(g.k)), padded(static_cast<size_t>(g.groups() * L.padded_group));
    const int64_t stride = row_bytes(w.format, g.k, g.group_size);
    for (int64_t n = 0; n < g.n; ++n) {
      if (!decode_row(w.format, w.data + n * stride, g.k, g.group_size, values.data()))
        throw std::runtime_error(std::string("corrupt ") + format_name(w.format) + " weights: row " +
                                 std::to_string(n) + " holds an invalid code");
      std::fill(padded.begin(), padded.end(), 0);
      for (int64_t gi = 0; gi < g.groups(); ++gi)
        std::copy_n(values.data() + g.group_begin(gi), g.group_length(gi), padded.data() + gi * L.padded_group);
      const int64_t tile = n / kTvmTile, r = n % kTvmTile;
      if (L.lut) {
        put_lut_row(padded.data(), tile, r, w.scales + n * g.groups());
        continue;
      }
      // W[tile, quad, 4 r + j]: code j of the quad, row r of the tile
      for (int64_t c = 0; c < L.codes; ++c) {
        const int8_t* v = padded.data() + c * L.lanes_per_code;
        uint8_t code;
        if (w.format == Format::kI2S)
          code = static_cast<uint8_t>((v[0] + 1) | (v[1] + 1) << 2 | (v[2] + 1) << 4 | (v[3] + 1) << 6);
        else
          code = w.format == Format::kSherry ? sherry_code(v) : tl2_code(v);
        weights_.data()[(tile * L.quads + c / 4) * 64 + 4 * r + c % 4] = code;
      }
      for (int64_t gi = 0; gi < g.groups(); ++gi)
        alpha_[(tile * g.groups() + gi) * kTvmTile + r] = half_to_float(w.scales[n * g.groups() + gi]);
    }
    // A first call on a zero row: an ABI or shape mismatch between the table and the objects
    // surfaces here, at session creation, rather than inside a parallel section.
    const AlignedArray<uint8_t> ws = aligned_array<uint8_t>(static_cast<size_t>(L.row_bytes));
    const AlignedArray<float> y = aligned_array<float>(static_cast<size_t>(g.n));
    call(entry_.m1, ws.get(), 1, y.get(), TaskRange{0, blocks, blocks});
  }

  KernelPath path() const override { return KernelPath::kTVM; }
  int64_t row_tile() const override { return layout_.lane_block; }
  // Calls that take the block functions run them on their own parallel steps, and their last rows
  // on the M = 1 function's: a tile of both, so that no step is cut (a cut step of the M = 1 function
  // is computed whole for each row) and each work item's calls (about 1 us each, for the functions'
  // argument checks) cover whole steps of both.
  int64_t row_tile_for(int64_t call_rows) const override {
    return call_rows >= entry_.block_rows ? std::lcm(layout_.block_lane_block, layout_.lane_block) : layout_.lane_block;
  }
  // Rows of A are cut only where N's steps cannot feed the threads: every compute() call decodes its
  // steps' weights again, and a chunk cut short of whole blocks runs its rows through the M = 1 function.
  int64_t min_row_chunk(int64_t call_rows) const override {
    return call_rows >= entry_.block_rows ? call_rows : 1;
  }
  size_t activation_row_bytes() const override { return static_cast<size_t>(layout_.row_bytes); }

  // Values quad by quad in dword order (byte 4p + j of a quad = column L j + p of it), then the float
  // scales, then the int32 sums of each group's values (layout.py activations). Each group is quantized
  // in place in column order (quantize_group's bytes, with AVX2: the entry's ISA has it), then every
  // quad is reordered through 16 bytes on the stack.
  void prepare_row(const float* a_row, uint8_t* ws) const override {
    const TvmLayout& L = layout_;
    if (L.lut) {  // the hand-written kernel's own quantization and table builder of the ISA, group by group
      auto* scale = reinterpret_cast<float*>(ws + L.scale_offset);
      for (int64_t g = 0; g < L.g.groups(); ++g) {
        const float* x = a_row + L.g.group_begin(g);
        uint8_t* tables = ws + g * L.pairs_per_group * kPairTableBytes;
        if (L.avx2_records)
          sherry_group_tables_avx2(x, L.g.group_length(g), 16 * L.pairs_per_group, tables, &scale[g]);
        else
          sherry_group_tables_avx512(x, L.g.group_length(g), 2 * L.pairs_per_group, tables, &scale[g]);
      }
      return;
    }
    auto* xq = reinterpret_cast<int8_t*>(ws);
    auto* scale = reinterpret_cast<float*>(ws + L.scale_offset);
    auto* sums = reinterpret_cast<int32_t*>(ws + L.scale_offset) + L.g.groups();
    std::memset(ws, 0, static_cast<size_t>(L.scale_offset));  // the groups' padding: zero activations
    const int64_t lpc = L.lanes_per_code, quad_cols = 4 * lpc;
    for (int64_t g = 0; g < L.g.groups(); ++g) {
      const int64_t length = L.g.group_length(g);
      if (length <= 0) break;  // never: tells the compiler the length is positive
      int8_t* out = xq + g * L.padded_group;
      scale[g] = quantize_group_simd(a_row + L.g.group_begin(g), length, out, &sums[g]);
      for (int64_t q = 0; q < L.quads_per_group; ++q) {
        int8_t* quad = out + q * quad_cols;
        int8_t columns[16];
        std::memcpy(columns, quad, static_cast<size_t>(quad_cols));
        for (int64_t j = 0; j < 4; ++j)
          for (int64_t p = 0; p < lpc; ++p) quad[4 * p + j] = columns[j * lpc + p];
      }
    }
  }

  // Rows of A in calls of the block function (chunk_rows rows), then of one block (block_rows), over
  // the block function's steps (block_lane_block rows of N) wholly inside [n_begin, n_end); what they
  // leave (the last rows of A, and the columns outside those steps) goes through the M = 1 function.
  // Functions write straight into Y when it is 64-byte aligned (TVM assumes so; rows of Y stay
  // aligned, N being a multiple of 16).
  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override {
    const int64_t n = layout_.g.n, row_bytes = layout_.row_bytes;
    const bool aligned = reinterpret_cast<uintptr_t>(y) % 64 == 0;
    int64_t r = 0, lo = n_end, hi = n_end;  // rows [0, r) are done in columns [lo, hi)
    if (aligned && m >= entry_.block_rows) {
      const int64_t lb = layout_.block_lane_block, first = ceil_div(n_begin, lb), last = n_end / lb;
      if (first < last) {
        const TaskRange steps{first, last, n / lb};
        for (; r + entry_.chunk_rows <= m; r += entry_.chunk_rows)
          call(entry_.mx, ws + r * row_bytes, entry_.chunk_rows, y + r * n, steps);
        for (; r + entry_.block_rows <= m; r += entry_.block_rows)
          call(entry_.mb, ws + r * row_bytes, entry_.block_rows, y + r * n, steps);
        lo = first * lb;
        hi = last * lb;
      }
    }
    if (r > 0) {
      single_rows(ws, 0, r, n_begin, lo, y);
      single_rows(ws, 0, r, hi, n_end, y);
    }
    single_rows(ws, r, m, n_begin, n_end, y);
    if (bias)
      for (int64_t row = 0; row < m; ++row)
        for (int64_t i = n_begin; i < n_end; ++i) y[row * n + i] += bias[i];
  }

 private:
  // Rows [r0, r1) of A, columns [n_begin, n_end), with the M = 1 function: its steps (lane_block rows)
  // wholly inside the range straight into an aligned Y; a step the range cuts, or any step of an
  // unaligned Y, into a step on the stack, then copied: the function writes only its step's columns,
  // so it is handed the stack step shifted back by the step's offset.
  void single_rows(const uint8_t* ws, int64_t r0, int64_t r1, int64_t n_begin, int64_t n_end, float* y) const {
    if (r0 >= r1 || n_begin >= n_end) return;
    const int64_t lb = layout_.lane_block, n = layout_.g.n, steps = n / lb, row_bytes = layout_.row_bytes;
    const int64_t first = n_begin / lb, last = ceil_div(n_end, lb);
    int64_t whole_begin = ceil_div(n_begin, lb), whole_end = n_end / lb;
    if (reinterpret_cast<uintptr_t>(y) % 64 != 0 || whole_begin >= whole_end) whole_begin = whole_end = last;
    if (whole_begin < whole_end)
      for (int64_t r = r0; r < r1; ++r)
        call(entry_.m1, ws + r * row_bytes, 1, y + r * n, TaskRange{whole_begin, whole_end, steps});
    alignas(64) float block[kMaxStepRows];
    for (int64_t b = first; b < last; ++b) {
      if (b >= whole_begin && b < whole_end) continue;
      const uintptr_t offset = static_cast<uintptr_t>(b * lb) * sizeof(float);  // a multiple of 64
      float* shifted = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(block) - offset);
      const int64_t lo = std::max(n_begin, b * lb), hi = std::min(n_end, (b + 1) * lb);
      for (int64_t r = r0; r < r1; ++r) {
        call(entry_.m1, ws + r * row_bytes, 1, shifted, TaskRange{b, b + 1, steps});
        std::copy(block + (lo - b * lb), block + (hi - b * lb), y + r * n + lo);
      }
    }
  }

  // Row r of tile `tile` into the LUT stream (lut.py weights: [superblock, chunk, block of the superblock,
  // group of the chunk, group_bytes]): per group and pair, the pair record of the tile, then the row's
  // float16 scale. AVX-512 records: index nibbles of pieces A | B << 4 at byte 4r + j, sign bits at
  // 64 + 8 piece + i / 8; AVX2 records (unit u = 2P + L of 4 columns): the index of unit pair P in
  // nibble P % 2 of byte 32 (P / 2) + 16 L + r, its sign in bit 7 - P of byte 128 + 16 L + r.
  // `padded`: the row's ternary values, groups padded to whole pairs.
  void put_lut_row(const int8_t* padded, int64_t tile, int64_t r, const uint16_t* scales) {
    const TvmLayout& L = layout_;
    const int64_t bt = L.block_tiles, b = tile / bt, tb = tile % bt;
    const int64_t step = b / L.step_blocks, sb = b % L.step_blocks;
    for (int64_t gi = 0; gi < L.g.groups(); ++gi) {
      const int64_t c = gi / L.chunk_groups, cg = gi % L.chunk_groups;
      uint8_t* group =
          weights_.data() + (((step * L.chunks + c) * L.step_blocks + sb) * L.chunk_groups + cg) * L.group_bytes;
      for (int64_t q = 0; q < L.pairs_per_group; ++q) {
        uint8_t* record = group + (q * bt + tb) * L.pair_bytes;
        const int8_t* values = padded + gi * L.padded_group + q * (L.avx2_records ? kPairColsAvx2 : kPairColsAvx512);
        if (L.avx2_records) {
          for (int u = 0; u < 16; ++u) {
            const uint8_t code = sherry_code(values + 4 * u);
            const int pair = u / 2, lane = u % 2;
            uint8_t& nibbles = record[32 * (pair / 2) + 16 * lane + r];
            uint8_t& signs = record[128 + 16 * lane + r];
            nibbles = static_cast<uint8_t>(nibbles | (code & 15) << (4 * (pair % 2)));
            signs = static_cast<uint8_t>(signs | (code >> 4) << (7 - pair));
          }
          continue;
        }
        for (int piece = 0; piece < 2; ++piece)
          for (int j = 0; j < 4; ++j) {
            const uint8_t code = sherry_code(values + 16 * piece + 4 * j);
            const int i = static_cast<int>(4 * r + j);
            record[i] = static_cast<uint8_t>(record[i] | (code & 15) << (4 * piece));
            record[64 + 8 * piece + i / 8] = static_cast<uint8_t>(record[64 + 8 * piece + i / 8] | (code >> 4) << (i % 8));
          }
      }
      std::memcpy(group + bt * L.pairs_per_group * L.pair_bytes + tb * kScaleBytes + 2 * r, &scales[gi], 2);
    }
  }

  void call(TvmFunction fn, const uint8_t* ws, int64_t m, float* y, TaskRange range) const {
    const TvmLayout& L = layout_;
    int64_t x_shape[2] = {m, L.row_bytes}, s_shape[2] = {m, L.row_bytes / 4}, y_shape[2] = {m, L.g.n};
    const int64_t tiles = L.g.n / kTvmTile;
    int64_t plane_shape[3] = {tiles, L.quads, 64};
    int64_t alpha_shape[3] = {tiles, L.g.groups(), kTvmTile};
    const DLDataType i8{kDLInt, 8, 1}, u8{kDLUInt, 8, 1}, f32{kDLFloat, 32, 1};
    auto* base = const_cast<uint8_t*>(ws);
    DLTensor tensors[6];
    int count = 0;
    // lut: X [m, row_bytes / 512, 512] (a pair's tables per slot), S, W (put_lut_row's order), Y
    int64_t lut_x_shape[3] = {m, L.row_bytes / kPairTableBytes, kPairTableBytes};
    int64_t lut_w_shape[5] = {L.superblocks, L.chunks, L.step_blocks, L.chunk_groups, L.group_bytes};
    tensors[count] = tensor(base, i8, L.lut ? lut_x_shape : x_shape);
    tensors[count++].ndim = L.lut ? 3 : 2;
    tensors[count++] = tensor(base + L.scale_offset, f32, s_shape);
    tensors[count] = tensor(const_cast<uint8_t*>(weights_.data()), u8, L.lut ? lut_w_shape : plane_shape);
    tensors[count++].ndim = L.lut ? 5 : 3;
    if (!L.lut) {  // the LUT stream carries its scales
      tensors[count] = tensor(alpha_.get(), f32, alpha_shape);
      tensors[count++].ndim = 3;
    }
    tensors[count++] = tensor(y, f32, y_shape);
    TVMFFIAny args[6];
    for (int i = 0; i < count; ++i) {
      args[i] = TVMFFIAny{};
      args[i].type_index = kTVMFFIDLTensorPtr;
      args[i].v_ptr = &tensors[i];
    }
    TVMFFIAny result{};
    const TaskRange saved = t_tasks;
    t_tasks = range;
    const int32_t rc = fn(nullptr, args, count, &result);
    t_tasks = saved;
    if (rc != 0) {
      std::string message = "TVM kernel (" + std::string(entry_.target) + ") failed";
      if (!t_error.empty()) message += ": " + t_error;
      t_error.clear();
      throw std::runtime_error(message);
    }
  }

  const TvmEntry& entry_;
  TvmLayout layout_;
  WeightBuffer weights_;  // the codes (plane) or the pair-record stream (lut)
  AlignedArray<float> alpha_;
};

// The entry for these weights that this CPU can run: AVX-512 first. SHERRY_TVM_TARGET=<target>
// (a database folder name, e.g. avx2) limits the choice to that target's kernels (tests, benchmarks).
// nullptr when there is none, with *detail saying why when the table has kernels of this shape.
const TvmEntry* find_entry(const PackedWeights& w, std::string* detail) {
  const char* only = std::getenv("SHERRY_TVM_TARGET");
  const TvmEntry* best = nullptr;
  std::string excluded, lacking;
  for (size_t i = 0; i < kTvmEntryCount; ++i) {
    const TvmEntry& e = kTvmEntries[i];
    if (e.format != static_cast<int>(w.format) || e.k != w.geometry.k || e.n != w.geometry.n ||
        e.group_size != w.geometry.group_size || !e.m1)
      continue;
    if (only && *only && std::string(only) != e.target) {
      excluded += (excluded.empty() ? "" : ", ") + std::string(e.target);
      continue;
    }
    const KernelPath isa = static_cast<KernelPath>(e.isa);
    if (const std::string& missing = missing_cpu_features(isa); !missing.empty()) {
      lacking += (lacking.empty() ? "" : "; ") + std::string(e.target) + " needs " + path_name(isa) +
                 " and this CPU lacks " + missing;
      continue;
    }
    if (!best || e.isa > best->isa) best = &e;
  }
  if (!best && !lacking.empty()) *detail = "its kernels for this shape cannot run here: " + lacking;
  else if (!best && !excluded.empty())
    *detail = std::string("SHERRY_TVM_TARGET=") + only + " leaves out its kernels for this shape (targets " +
              excluded + ")";
  return best;
}

// Why there is no TVM kernel: "<summary> (<detail>)".
std::string no_kernel(const std::string& summary, const std::string& detail) {
  return detail.empty() ? summary : summary + " (" + detail + ")";
}

std::string times(double speedup) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2fx", speedup);
  return text;
}

}  // namespace

std::unique_ptr<MatMulKernel> make_tvm_kernel(const PackedWeights& w, std::string* declined) {
  (void)hooks_installed;
  std::string detail;
  const TvmEntry* entry = find_entry(w, &detail);
  if (!entry) {
    if (declined)
      *declined = no_kernel(kNoKernel, detail) + ": tune it with `sherry tune` and rebuild, see docs/tvm.md";
    return nullptr;
  }
  return std::make_unique<TvmKernel>(w, *entry);
}

TvmAutoChoice make_tvm_kernel_if_faster(const PackedWeights& w, KernelPath hand) {
  (void)hooks_installed;
  TvmAutoChoice choice;
  const std::string passed = std::string(path_name(hand)) + ": ";
  std::string detail;
  const TvmEntry* entry = find_entry(w, &detail);
  if (!entry) {
    choice.single_reason = passed + no_kernel("no tuned TVM kernel for this shape", detail);
    return choice;
  }
  choice.batch_min_rows = entry->batch_min_rows;
  const std::string kernel = std::string("the TVM kernel (") + entry->target + " target)";
  const KernelPath isa = static_cast<KernelPath>(entry->isa);
  if (isa != hand) {
    choice.single_reason = passed + kernel + " is an " + path_name(isa) + " kernel, timed against " +
                           path_name(isa) + ", not " + path_name(hand);
    choice.batch_min_rows = 0;  // one reason for every call
    return choice;
  }
  const std::string here = cpu_model_name() + ", " + cpu_model_id();
  // The verdict of one regime from its speed-ups (all >= kTvmMinSpeedup: TVM is faster) and their
  // description. `regime` names the measure for a kernel never timed ("at M=1").
  const auto decide = [&](std::initializer_list<double> speedups, const std::string& measure, const char* regime,
                          std::string* reason) {
    bool timed = true, faster = true, ahead = true;
    for (double s : speedups) {
      timed = timed && s > 0;
      faster = faster && s >= kTvmMinSpeedup;
      ahead = ahead && s > 1;
    }
    if (!timed) {
      *reason = passed + kernel + " was never timed against " + path_name(hand) + " " + regime +
                " (sherry tune --verify)";
      return false;
    }
    const std::string timed_as = "the tuning database timed " + kernel + " at " + measure;
    if (!*entry->cpu) {
      *reason = passed + timed_as + " on an unrecorded CPU; re-run sherry tune --verify on this one (" + here + ")";
      return false;
    }
    if (cpu_model_id() != entry->cpu) {
      *reason = passed + timed_as + " on another CPU model (" + entry->cpu_name + ", " + entry->cpu +
                "), not this one (" + here + ")";
      return false;
    }
    *reason = (faster ? "tvm: " : passed) + timed_as + " on this CPU (" + here + ")";
    if (ahead && !faster) *reason += ": within the " + times(kTvmMinSpeedup) + " margin auto asks for";
    return faster;
  };
  const std::string single = times(entry->hot_speedup) + " the speed of " + path_name(hand) + " hot and " +
                             times(entry->cold_speedup) + " cold (onnxruntime nodes, M=1)";
  choice.single = decide({entry->hot_speedup, entry->cold_speedup}, single, "at M=1", &choice.single_reason);
  if (!choice.single && entry->hot_speedup > 0 && entry->cold_speedup > 0 && *entry->cpu &&
      cpu_model_id() == entry->cpu)
    choice.single_reason += ": not faster both hot and cold";
  const std::string batch = times(entry->batch_speedup) + " the speed of " + path_name(hand) + " at batch " +
                            std::to_string(entry->batch) + " (onnxruntime nodes, hot)";
  choice.batch = decide({entry->batch_speedup}, batch, ("at batch " + std::to_string(entry->batch)).c_str(),
                        &choice.batch_reason);
  if (choice.single || choice.batch) choice.kernel = std::make_unique<TvmKernel>(w, *entry);
  return choice;
}

}  // namespace sherry

extern "C" void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  std::string& error = sherry::t_error;
  error = kind ? kind : "Error";
  error += ": ";
  for (int32_t i = 0; i < num_parts; ++i)
    if (parts[i]) error += parts[i];
}

#else  // built without TVM kernels

namespace sherry {
namespace {
constexpr const char* kWithoutTvm =
    "the library was built without TVM kernels (SHERRY_TVM=OFF, or no importable TVM when it was built)";
}  // namespace

std::unique_ptr<MatMulKernel> make_tvm_kernel(const PackedWeights&, std::string* declined) {
  if (declined)
    *declined = std::string(kNoKernel) + " (" + kWithoutTvm +
                "): rebuild it with them (make lib with apache-tvm installed), after `sherry tune` if the database "
                "lacks this shape; see docs/tvm.md";
  return nullptr;
}

TvmAutoChoice make_tvm_kernel_if_faster(const PackedWeights&, KernelPath hand) {
  TvmAutoChoice choice;
  choice.single_reason = std::string(path_name(hand)) + ": " + kWithoutTvm;
  return choice;
}
}  // namespace sherry

#endif
