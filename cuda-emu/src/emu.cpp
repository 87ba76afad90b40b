// The emulator's scheduler: a grid runs block by block; a block's threads are fibers
// run in turn, each until it reaches a barrier, a shuffle or its end. A fiber starts on
// its own stack through ucontext; after that, switches are _setjmp/_longjmp, which
// unlike swapcontext make no system call (the signal mask is left alone). A
// block barrier opens when every live thread of the block waits at one, a warp's when
// every live lane of the warp does; threads that have returned no longer count, as on
// a GPU. Nothing runnable and nothing to open is a deadlock: reported, not hung.
#include "cuda_emu.h"

#include <setjmp.h>
#include <ucontext.h>

#include <mutex>
#include <string>
#include <vector>

namespace emu {
dim3 block_idx, block_dim, grid_dim;

namespace {
enum class State { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  dim3 index;
  State state = State::Ready;
  bool started = false;
};

// Fibers' stacks: the kernels' frames are small; the Rust closure that calls the
// kernel adds a few.
constexpr size_t STACK_BYTES = 128 * 1024;
// A block's dynamic shared memory, at most what a block may have without opting in.
constexpr size_t MAX_SHARED_BYTES = 48 * 1024;

struct Block {
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  std::vector<uint64_t> slots;
  ucontext_t scheduler;
  jmp_buf back;
  Fiber *current = nullptr;
  // Threads run from the last to the first between barriers.
  bool reverse = false;
  void (*body)(void *) = nullptr;
  void *ctx = nullptr;
};

Block *running = nullptr;
alignas(16) unsigned char shared_memory[MAX_SHARED_BYTES];
std::string last_error;
// The kernels' `__shared__` statics are one per kernel, not per launch: one grid at a
// time in the whole process.
std::mutex one_grid;

void wait(State state) {
  Fiber *f = running->current;
  f->state = state;
  if (_setjmp(f->resume) == 0) _longjmp(running->back, 1);
}

[[noreturn]] void entry() {
  running->body(running->ctx);
  running->current->state = State::Done;
  _longjmp(running->back, 1);
}

// Runs `f` until it waits or ends.
void resume(Block &b, Fiber &f) {
  b.current = &f;
  if (_setjmp(b.back) != 0) return;
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  swapcontext(&b.scheduler, &f.context);
}

// Runs one block; an empty string when it completed.
std::string run_block(Block &b) {
  const unsigned n = block_dim.x;
  const unsigned warps = (n + 31) / 32;
  for (unsigned t = 0; t < n; ++t) {
    Fiber &f = b.fibers[t];
    f.index = dim3{t, 0, 0};
    f.state = State::Ready;
    f.started = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = b.stacks.data() + (size_t)t * STACK_BYTES;
    f.context.uc_stack.ss_size = STACK_BYTES;
    f.context.uc_link = nullptr;
    makecontext(&f.context, (void (*)())entry, 0);
  }
  // Uninitialised shared memory reads as NaN floats (or huge integers), not zeros.
  memset(shared_memory, 0xff, sizeof shared_memory);
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      Fiber &f = b.fibers[b.reverse ? n - 1 - i : i];
      if (f.state == State::Ready) resume(b, f);
    }
    bool opened = false, any_live = false, all_at_block = true;
    for (unsigned w = 0; w < warps; ++w) {
      bool live = false, all_at_warp = true;
      for (unsigned t = w * 32; t < n && t < (w + 1) * 32; ++t) {
        const State s = b.fibers[t].state;
        if (s == State::Done) continue;
        live = true;
        all_at_warp &= s == State::AtWarp;
        all_at_block &= s == State::AtBlock;
      }
      any_live |= live;
      if (live && all_at_warp) {
        for (unsigned t = w * 32; t < n && t < (w + 1) * 32; ++t)
          if (b.fibers[t].state == State::AtWarp) b.fibers[t].state = State::Ready;
        opened = true;
      }
    }
    if (!any_live) return "";
    if (all_at_block) {
      for (Fiber &f : b.fibers)
        if (f.state == State::AtBlock) f.state = State::Ready;
      opened = true;
    }
    if (!opened) {
      std::string who;
      for (unsigned t = 0; t < n; ++t) {
        const State s = b.fibers[t].state;
        if (s == State::AtWarp) who += " " + std::to_string(t) + ":shuffle";
        else if (s == State::AtBlock) who += " " + std::to_string(t) + ":barrier";
        if (who.size() > 200) break;
      }
      return "deadlock in block (" + std::to_string(block_idx.x) + ", " +
             std::to_string(block_idx.y) + "): threads wait at different barriers:" + who;
    }
  }
}
}  // namespace

const dim3 &thread_idx() { return running->current->index; }
void *dynamic_shared() { return shared_memory; }
void sync_block() { wait(State::AtBlock); }
void sync_warp() { wait(State::AtWarp); }

uint64_t *warp_slots() { return running->slots.data() + (thread_idx().x / 32) * 32; }

void check_lane(unsigned lane) {
  const unsigned t = (thread_idx().x / 32) * 32 + lane;
  if (t >= block_dim.x || running->fibers[t].state == State::Done) {
    // Nothing sensible to read: end the launch with the error.
    last_error = "a shuffle read lane " + std::to_string(lane) + ", which has exited";
    running->current->state = State::Done;
    _longjmp(running->back, 1);
  }
}
}  // namespace emu

namespace emu {
namespace {
int launch_grid(unsigned grid_x, unsigned grid_y, unsigned block_x, size_t shared_bytes,
                bool reverse, void (*body)(void *), void *ctx);
}
}  // namespace emu

extern "C" {
// Runs `body` (which calls one kernel) as every thread of a `grid_x` x `grid_y` grid
// of `block_x`-thread blocks with `shared_bytes` of dynamic shared memory, the threads
// of a block taken first to last between barriers, or last to first when `reverse`
// (a kernel missing a barrier reads what another thread has not written yet in one of
// the two orders). Returns 0, or 1 with what went wrong in `error` (`error_len` bytes,
// NUL-terminated).
int emu_launch(unsigned grid_x, unsigned grid_y, unsigned block_x, size_t shared_bytes,
               int reverse, void (*body)(void *), void *ctx, char *error, size_t error_len) {
  using namespace emu;
  std::lock_guard<std::mutex> lock(one_grid);
  last_error.clear();
  const int status =
      launch_grid(grid_x, grid_y, block_x, shared_bytes, reverse != 0, body, ctx);
  if (status != 0 && error_len > 0) {
    const size_t n = last_error.size() < error_len - 1 ? last_error.size() : error_len - 1;
    memcpy(error, last_error.data(), n);
    error[n] = 0;
  }
  return status;
}
}

namespace emu {
namespace {
int launch_grid(unsigned grid_x, unsigned grid_y, unsigned block_x, size_t shared_bytes,
                bool reverse, void (*body)(void *), void *ctx) {
  if (block_x == 0 || block_x > 1024) {
    last_error = "a block has 1 to 1024 threads, not " + std::to_string(block_x);
    return 1;
  }
  if (shared_bytes > MAX_SHARED_BYTES) {
    last_error = std::to_string(shared_bytes) + " bytes of dynamic shared memory: a block has " +
                 std::to_string(MAX_SHARED_BYTES) + " without opting in";
    return 1;
  }
  Block b;
  b.fibers.resize(block_x);
  b.stacks.resize((size_t)block_x * STACK_BYTES);
  b.slots.assign(((block_x + 31) / 32) * 32, 0);
  b.body = body;
  b.ctx = ctx;
  b.reverse = reverse;
  grid_dim = dim3{grid_x, grid_y, 1};
  block_dim = dim3{block_x, 1, 1};
  running = &b;
  for (unsigned y = 0; y < grid_y; ++y)
    for (unsigned x = 0; x < grid_x; ++x) {
      block_idx = dim3{x, y, 0};
      std::string err = run_block(b);
      if (err.empty() && !last_error.empty()) err = last_error;
      if (!err.empty()) {
        last_error = err;
        running = nullptr;
        return 1;
      }
    }
  running = nullptr;
  return 0;
}
}  // namespace
}  // namespace emu
