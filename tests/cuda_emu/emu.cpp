// pe_emu's runtime: the CUDA execution model on the CPU (README.md).
//
// Every CUDA thread of a block is a fiber with its own stack. The scheduler (the launching OS
// thread) resumes the runnable fibers of a block in the schedule's order, round after round; a
// fiber runs until it waits (a barrier, a warp rendezvous) or exits. A barrier releases when all
// threads of the block wait at it; a warp rendezvous completes when every lane of its mask waits
// at the same intrinsic with the same mask. A round with nothing runnable and threads still
// waiting is a deadlock or a divergent barrier: reported, the grid aborted, a sticky error set.
//
// Fiber switches: a hand-written x86-64 switch (callee-saved registers, MXCSR and the x87
// control word), or ucontext elsewhere (or with -DPE_EMU_UCONTEXT); both annotated for
// AddressSanitizer.
#include "emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#include "include/cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#define PE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PE_EMU_ASAN 1
#endif
#endif
#ifdef PE_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) && !defined(PE_EMU_UCONTEXT)
#define PE_EMU_UCONTEXT 1
#endif
#ifdef PE_EMU_UCONTEXT
#include <ucontext.h>
#endif

extern const int warpSize = 32;

namespace pe_emu {
namespace detail {

Builtins builtins;

namespace {

// ---- Fiber stacks -------------------------------------------------------------------------------
// Deep enough for printf and ASan's larger frames (measured: stack_bytes_peak() in selftest);
// a guard page below each stack turns an overflow into a fault.
#ifdef PE_EMU_ASAN
constexpr size_t kStackBytes = 256 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

struct Stack {
  char* lo = nullptr;  // lowest usable byte (the guard page is below)
  bool dirty = false;  // its last fiber did not return: stale ASan shadow may remain
};

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

Stack make_stack() {
  const size_t guard = page_size();
  void* p = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "pe_emu: cannot map a fiber stack\n");
    std::abort();
  }
  if (mprotect(p, guard, PROT_NONE) != 0) {
    std::fprintf(stderr, "pe_emu: cannot protect a fiber stack's guard page\n");
    std::abort();
  }
  Stack s;
  s.lo = static_cast<char*>(p) + guard;
  return s;
}

// ---- Context switch -----------------------------------------------------------------------------
#ifndef PE_EMU_UCONTEXT
// pe_emu_switch(&save_sp, new_sp): pushes the callee-saved state, saves rsp, loads new_sp, pops.
asm(R"(
  .text
  .p2align 4
  .type pe_emu_switch, @function
pe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pe_emu_switch, .-pe_emu_switch
)");
extern "C" void pe_emu_switch(void** save_sp, void* new_sp) asm("pe_emu_switch");
#endif

struct Context {
#ifdef PE_EMU_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Exited };

struct Thread {
  Context ctx;
  int stack = -1;
  uint3 idx{0, 0, 0};
  State state = State::Runnable;
  bool finished = false;  // returned from the kernel (not aborted)
  // At a barrier:
  const char* bar_file = nullptr;
  int bar_line = 0;
  // At a warp rendezvous:
  WarpKind kind = WarpKind::SyncWarp;
  unsigned mask = 0;
  uint64_t bits = 0, result = 0;
  int operand = 0, width = 32;
};

struct SharedAlloc {
  const void* key;
  void* ptr;
};

struct Scheduler {
  // Launch
  Entry entry = nullptr;
  void* ctx = nullptr;
  LaunchSite site{};
  dim3 grid, block;
  size_t dynamic_bytes = 0;
  bool in_grid = false;
  bool aborted = false;
  // Block
  uint3 block_idx{0, 0, 0};
  std::vector<Thread> threads;
  int nthreads = 0, exited = 0, at_barrier = 0;
  std::vector<SharedAlloc> shared;
  size_t static_bytes = 0;
  void* dynamic = nullptr;
  Thread* current = nullptr;
  Context home;  // the scheduler's own context
  // Fibers
  std::vector<Stack> stacks;
  // Schedule
  Order order = Order::InOrder;
  uint64_t rng = 0;
  std::vector<int> run;
  // Errors
  cudaError_t last = cudaSuccess, sticky = cudaSuccess;
  std::string message;
  Stats stats;
  std::map<std::string, int64_t> sites;  // launch_sites()
#ifdef PE_EMU_ASAN
  const void* home_stack_lo = nullptr;
  size_t home_stack_size = 0;
#endif
};

Scheduler& S() {
  static Scheduler* s = new Scheduler;  // never destroyed: fibers may outlive static teardown
  return *s;
}

std::mutex& launch_lock() {
  static std::mutex* m = new std::mutex;
  return *m;
}

// ---- Messages ----------------------------------------------------------------------------------

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// "0-31, 40, 42-43"
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += ids[i] == ids[j] ? format("%d", ids[i]) : format("%d-%d", ids[i], ids[j]);
    i = j + 1;
  }
  return out;
}

std::string where() {
  Scheduler& s = S();
  return format("kernel %s (launched at %s:%d), block (%u, %u, %u)", s.site.kernel, s.site.file,
                s.site.line, s.block_idx.x, s.block_idx.y, s.block_idx.z);
}

const char* kind_name(WarpKind k) {
  switch (k) {
    case WarpKind::ShflIdx: return "__shfl_sync";
    case WarpKind::ShflUp: return "__shfl_up_sync";
    case WarpKind::ShflDown: return "__shfl_down_sync";
    case WarpKind::ShflXor: return "__shfl_xor_sync";
    case WarpKind::Ballot: return "__ballot_sync";
    case WarpKind::Any: return "__any_sync";
    case WarpKind::All: return "__all_sync";
    case WarpKind::SyncWarp: return "__syncwarp";
  }
  return "?";
}

// Records an error and aborts the grid (no further thread or block runs).
void fail(cudaError_t err, bool sticky, const std::string& msg) {
  Scheduler& s = S();
  s.aborted = true;
  if (sticky) {
    if (s.sticky == cudaSuccess) s.sticky = err;
  } else {
    s.last = err;
  }
  s.message = msg;
  std::fprintf(stderr, "pe_emu: %s\n", msg.c_str());
  std::fflush(stderr);
}

// ---- Fibers -------------------------------------------------------------------------------------

void switch_context(Context* from, Context* to, const void* to_stack_lo, size_t to_stack_size,
                    bool from_done) {
#ifdef PE_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(from_done ? nullptr : &fake, to_stack_lo, to_stack_size);
#else
  (void)to_stack_lo;
  (void)to_stack_size;
  (void)from_done;
#endif
#ifdef PE_EMU_UCONTEXT
  swapcontext(&from->uc, &to->uc);
#else
  pe_emu_switch(&from->sp, to->sp);
#endif
#ifdef PE_EMU_ASAN
  Scheduler& s = S();
  // Back here: whoever switched to us was the scheduler if we are a fiber, or a fiber if we are
  // the scheduler (its stack is not needed then).
  if (s.current != nullptr && from != &s.home) {
    __sanitizer_finish_switch_fiber(fake, &s.home_stack_lo, &s.home_stack_size);
  } else {
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
  }
#endif
}

// From a fiber back to the scheduler; `done`: never to be resumed.
void yield_to_scheduler(bool done) {
  Scheduler& s = S();
  Thread* t = s.current;
#ifdef PE_EMU_ASAN
  switch_context(&t->ctx, &s.home, s.home_stack_lo, s.home_stack_size, done);
#else
  switch_context(&t->ctx, &s.home, nullptr, 0, done);
#endif
}

// Ends the calling fiber for good (the grid was aborted).
[[noreturn]] void abandon_fiber() {
  Scheduler& s = S();
  s.current->state = State::Exited;
  ++s.exited;
  yield_to_scheduler(true);
  __builtin_unreachable();
}

void fiber_main() {
  Scheduler& s = S();
#ifdef PE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.home_stack_lo, &s.home_stack_size);
#endif
  try {
    s.entry(s.ctx);
  } catch (const std::exception& e) {
    fail(cudaErrorLaunchFailure, true,
         format("%s, thread (%u, %u, %u): the kernel threw %s", where().c_str(),
                s.current->idx.x, s.current->idx.y, s.current->idx.z, e.what()));
  } catch (...) {
    fail(cudaErrorLaunchFailure, true,
         format("%s, thread (%u, %u, %u): the kernel threw an exception", where().c_str(),
                s.current->idx.x, s.current->idx.y, s.current->idx.z));
  }
  Thread* t = s.current;
  t->finished = true;
  t->state = State::Exited;
  ++s.exited;
  yield_to_scheduler(true);
  __builtin_unreachable();
}

#ifdef PE_EMU_UCONTEXT
void fiber_main_uc() { fiber_main(); }
#else
extern "C" void pe_emu_fiber_main() { fiber_main(); }
#endif

void init_fiber(Thread& t, Stack& st) {
#ifdef PE_EMU_ASAN
  // A fiber that did not return left the shadow of its frames poisoned; one that did still
  // leaves fiber_main's frame (it never returns), where the new frame is written below.
  if (st.dirty) {
    __asan_unpoison_memory_region(st.lo, kStackBytes);
  } else {
    __asan_unpoison_memory_region(st.lo + kStackBytes - page_size(), page_size());
  }
#endif
  st.dirty = true;  // until its fiber returns
#ifdef PE_EMU_UCONTEXT
  getcontext(&t.ctx.uc);
  t.ctx.uc.uc_stack.ss_sp = st.lo;
  t.ctx.uc.uc_stack.ss_size = kStackBytes;
  t.ctx.uc.uc_link = nullptr;
  makecontext(&t.ctx.uc, fiber_main_uc, 0);
#else
  // The frame pe_emu_switch pops: MXCSR / x87 control word, r15..rbp, then the "return address"
  // pe_emu_fiber_main, entered with rsp = 8 mod 16 as after a call.
  uintptr_t top = reinterpret_cast<uintptr_t>(st.lo + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                         // fake return address
  *--sp = reinterpret_cast<uint64_t>(&pe_emu_fiber_main);            // ret target
  for (int r = 0; r < 6; ++r) *--sp = 0;                             // rbp rbx r12-r15
  *--sp = uint64_t(0x1F80) | (uint64_t(0x037F) << 32);               // default MXCSR, FPU CW
  t.ctx.sp = sp;
#endif
}

void resume(Thread& t) {
  Scheduler& s = S();
  s.current = &t;
  builtins.thread_idx = t.idx;
  switch_context(&s.home, &t.ctx, s.stacks[t.stack].lo, kStackBytes, false);
  s.current = nullptr;
  if (t.state == State::Exited && t.finished) s.stacks[t.stack].dirty = false;
}

// ---- Schedules ---------------------------------------------------------------------------------

uint64_t next_random() {  // splitmix64
  uint64_t z = (S().rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void order_in_place(std::vector<int>& v) {
  Scheduler& s = S();
  if (s.order == Order::Reversed) {
    std::reverse(v.begin(), v.end());
  } else if (s.order == Order::Shuffled) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
  }
}

// A permutation of [0, n) for the block order under Shuffled, without materialising it (grids
// may have 2^31 x 65535 x 65535 blocks): a keyed bijection on [0, 2^bits), cycle-walked into
// [0, n).
struct BlockPermutation {
  uint64_t n, mask, k1, k2;
  int shift;
  explicit BlockPermutation(uint64_t count) : n(count) {
    int bits = 1;
    while ((uint64_t(1) << bits) < n) ++bits;
    mask = (uint64_t(1) << bits) - 1;
    shift = bits / 2 + 1;
    k1 = next_random() | 1;
    k2 = next_random();
  }
  uint64_t step(uint64_t x) const {
    for (int r = 0; r < 3; ++r) {
      x = (x * k1 + k2) & mask;  // odd multiplier, any addend: bijective mod 2^bits
      x ^= x >> shift;           // bijective
    }
    return x;
  }
  uint64_t operator()(uint64_t i) const {
    uint64_t x = step(i);
    while (x >= n) x = step(x);
    return x;
  }
};

// ---- A block ---------------------------------------------------------------------------------

std::string describe_thread_state(const Thread& t) {
  switch (t.state) {
    case State::Exited: return "exited";
    case State::AtBarrier: return format("at __syncthreads (%s:%d)", t.bar_file, t.bar_line);
    case State::AtWarp: return format("at %s(mask=0x%08x)", kind_name(t.kind), t.mask);
    case State::Runnable: return "runnable";
  }
  return "?";
}

// Nothing runnable, threads still waiting: say what is stuck, then fail the grid.
void report_stall() {
  Scheduler& s = S();
  std::string msg;
  // Warp rendezvous that cannot complete, per warp.
  const int warps = (s.nthreads + 31) / 32;
  int described = 0;
  for (int w = 0; w < warps && described < 4; ++w) {
    const int base = w * 32;
    const int lanes = std::min(32, s.nthreads - base);
    std::vector<bool> seen(lanes, false);
    for (int l = 0; l < lanes; ++l) {
      const Thread& t = s.threads[base + l];
      if (t.state != State::AtWarp || seen[l]) continue;
      std::vector<int> group;
      for (int m = l; m < lanes; ++m) {
        const Thread& u = s.threads[base + m];
        if (u.state == State::AtWarp && u.kind == t.kind && u.mask == t.mask) {
          group.push_back(m);
          seen[m] = true;
        }
      }
      // The lanes of the mask that are elsewhere, grouped by what they do.
      std::map<std::string, std::vector<int>> elsewhere;
      for (int m = 0; m < lanes; ++m) {
        if (!(t.mask >> m & 1u)) continue;
        const Thread& u = s.threads[base + m];
        if (u.state == State::AtWarp && u.kind == t.kind && u.mask == t.mask) continue;
        elsewhere[describe_thread_state(u)].push_back(m);
      }
      std::string missing;
      for (const auto& kv : elsewhere) {
        const bool one = kv.second.size() == 1;
        missing += format("; lane%s %s %s%s", one ? "" : "s", ranges(kv.second).c_str(),
                          kv.first == "exited" ? "" : (one ? "waits " : "wait "),
                          kv.first.c_str());
      }
      msg += format("%swarp %d: lane%s %s %s at %s(mask=0x%08x)%s", msg.empty() ? "" : " | ", w,
                    group.size() == 1 ? "" : "s", ranges(group).c_str(),
                    group.size() == 1 ? "waits" : "wait", kind_name(t.kind), t.mask,
                    missing.c_str());
      ++described;
    }
  }
  if (!msg.empty()) {
    fail(cudaErrorLaunchFailure, true,
         format("deadlock in %s: %s", where().c_str(), msg.c_str()));
    return;
  }
  // Barrier waiters with exited threads (the only other way to stall).
  std::vector<int> waiting, gone;
  const Thread* first = nullptr;
  for (int i = 0; i < s.nthreads; ++i) {
    const Thread& t = s.threads[i];
    if (t.state == State::AtBarrier) {
      waiting.push_back(i);
      if (first == nullptr) first = &t;
    } else if (t.state == State::Exited) {
      gone.push_back(i);
    }
  }
  fail(cudaErrorLaunchFailure, true,
       format("divergent __syncthreads in %s: threads %s wait at __syncthreads (%s:%d) while "
              "threads %s exited",
              where().c_str(), ranges(waiting).c_str(), first ? first->bar_file : "?",
              first ? first->bar_line : 0, ranges(gone).c_str()));
}

// All threads wait at a barrier: fails the grid (and returns true) if not all at this one.
bool report_divergent_barriers(const char* file, int line) {
  Scheduler& s = S();
  std::vector<int> here, there;
  const Thread* other = nullptr;
  for (int j = 0; j < s.nthreads; ++j) {
    const Thread& v = s.threads[j];
    const bool same = v.bar_line == line && std::strcmp(v.bar_file, file) == 0;
    (same ? here : there).push_back(j);
    if (!same && other == nullptr) other = &v;
  }
  if (other == nullptr) return false;
  fail(cudaErrorLaunchFailure, true,
       format("divergent __syncthreads in %s: threads %s wait at %s:%d, threads %s at %s:%d",
              where().c_str(), ranges(here).c_str(), file, line, ranges(there).c_str(),
              other->bar_file, other->bar_line));
  return true;
}

void run_block(uint3 bidx) {
  Scheduler& s = S();
  s.block_idx = bidx;
  builtins.block_idx = bidx;
  const unsigned bx = s.block.x, by = s.block.y;
  s.nthreads = static_cast<int>(bx * by * s.block.z);
  s.exited = 0;
  s.at_barrier = 0;
  s.static_bytes = 0;
  s.threads.resize(s.nthreads);
  while (static_cast<int>(s.stacks.size()) < s.nthreads) s.stacks.push_back(make_stack());
  s.dynamic = ::operator new(s.dynamic_bytes, std::align_val_t(16));
  std::memset(s.dynamic, 0xFF, s.dynamic_bytes);
  s.stats.shared_bytes_peak =
      std::max<int64_t>(s.stats.shared_bytes_peak, static_cast<int64_t>(s.dynamic_bytes));
  for (int i = 0; i < s.nthreads; ++i) {
    Thread& t = s.threads[i];
    t = Thread();
    t.stack = i;
    const unsigned u = static_cast<unsigned>(i);
    t.idx = uint3{u % bx, (u / bx) % by, u / (bx * by)};
    init_fiber(t, s.stacks[i]);
  }
  ++s.stats.blocks;
  s.stats.threads += s.nthreads;

  while (!s.aborted) {
    s.run.clear();
    for (int i = 0; i < s.nthreads; ++i)
      if (s.threads[i].state == State::Runnable) s.run.push_back(i);
    if (s.run.empty()) {
      if (s.exited < s.nthreads) report_stall();
      break;
    }
    order_in_place(s.run);
    for (int i : s.run) {
      if (s.aborted) break;
      resume(s.threads[i]);
    }
  }

  for (const SharedAlloc& a : s.shared) ::operator delete(a.ptr, std::align_val_t(16));
  s.shared.clear();
  ::operator delete(s.dynamic, std::align_val_t(16));
  s.dynamic = nullptr;
}

Thread& current_thread(const char* what) {
  Scheduler& s = S();
  if (s.current == nullptr) {
    std::fprintf(stderr, "pe_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *s.current;
}

// ---- Errors and validation ----------------------------------------------------------------------

bool valid_config(dim3 g, dim3 b, size_t shared, std::string* why) {
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0) {
    *why = "a zero grid or block dimension";
    return false;
  }
  if (b.x > 1024 || b.y > 1024 || b.z > 64) {
    *why = "a block dimension above its limit (x, y <= 1024, z <= 64)";
    return false;
  }
  if (uint64_t(b.x) * b.y * b.z > 1024) {
    *why = "more than 1024 threads per block";
    return false;
  }
  if (g.x > 0x7FFFFFFFu || g.y > 65535 || g.z > 65535) {
    *why = "a grid dimension above its limit (x < 2^31, y, z <= 65535)";
    return false;
  }
  if (shared > 48 * 1024) {
    *why = "more than 48 KiB of dynamic shared memory (the opt-in above it is not emulated)";
    return false;
  }
  return true;
}

struct Cap {
  std::vector<void*> vars;
  bool is_int64;
  int64_t value, default_value;
};
std::map<std::string, Cap>& cap_registry() {
  static auto* m = new std::map<std::string, Cap>;
  return *m;
}
void store_cap(Cap& c, int64_t v) {
  c.value = v;
  for (void* p : c.vars) {
    if (c.is_int64) {
      *static_cast<int64_t*>(p) = v;
    } else {
      *static_cast<int*>(p) = static_cast<int>(v);
    }
  }
}

}  // namespace

// ---- Runtime entry points (emu.h, include/cuda_runtime.h) ---------------------------------------

void run_grid(Entry entry, void* ctx, dim3 grid, dim3 block, size_t shared_bytes,
              const LaunchSite& site) {
  Scheduler& s = S();
  if (s.in_grid && s.current != nullptr) {
    fail(cudaErrorLaunchFailure, true,
         format("%s launches %s from device code (dynamic parallelism is not emulated)",
                where().c_str(), site.kernel));
    abandon_fiber();
  }
  std::lock_guard<std::mutex> guard(launch_lock());
  if (s.sticky != cudaSuccess) return;  // the context is unusable until reset_device()
  std::string why;
  if (!valid_config(grid, block, shared_bytes, &why)) {
    s.last = cudaErrorInvalidConfiguration;
    s.message = format("launch of %s at %s:%d refused: grid (%u, %u, %u), block (%u, %u, %u), "
                       "%zu bytes of dynamic shared memory: %s",
                       site.kernel, site.file, site.line, grid.x, grid.y, grid.z, block.x,
                       block.y, block.z, shared_bytes, why.c_str());
    return;
  }
  s.entry = entry;
  s.ctx = ctx;
  s.site = site;
  s.grid = grid;
  s.block = block;
  s.dynamic_bytes = shared_bytes;
  s.aborted = false;
  s.in_grid = true;
  builtins.grid_dim = grid;
  builtins.block_dim = block;
  ++s.stats.launches;
  const char* file_name = std::strrchr(site.file, '/');
  ++s.sites[std::string(file_name ? file_name + 1 : site.file) + ":" + site.kernel];

  const uint64_t gx = grid.x, gy = grid.y, n = gx * gy * grid.z;
  if (s.order == Order::Shuffled) {
    const BlockPermutation perm(n);
    for (uint64_t i = 0; i < n && !s.aborted; ++i) {
      const uint64_t b = perm(i);
      run_block(uint3{unsigned(b % gx), unsigned(b / gx % gy), unsigned(b / (gx * gy))});
    }
  } else {
    for (uint64_t i = 0; i < n && !s.aborted; ++i) {
      const uint64_t b = s.order == Order::Reversed ? n - 1 - i : i;
      run_block(uint3{unsigned(b % gx), unsigned(b / gx % gy), unsigned(b / (gx * gy))});
    }
  }
  s.in_grid = false;
}

void syncthreads(const char* file, int line) {
  Scheduler& s = S();
  Thread& t = current_thread("__syncthreads");
  t.state = State::AtBarrier;
  t.bar_file = file;
  t.bar_line = line;
  if (++s.at_barrier == s.nthreads) {
    // Everyone arrived (nobody exited): one barrier, or diverging ones.
    if (report_divergent_barriers(file, line)) abandon_fiber();
    for (int i = 0; i < s.nthreads; ++i) s.threads[i].state = State::Runnable;
    s.at_barrier = 0;  // the last to arrive yields too: the schedule orders every thread
  }
  yield_to_scheduler(false);
}

uint64_t warp_collective(WarpKind kind, unsigned mask, uint64_t bits, int operand, int width) {
  Scheduler& s = S();
  Thread& t = current_thread(kind_name(kind));
  const int linear = static_cast<int>(&t - s.threads.data());
  const int lane = linear % 32, base = linear - lane;
  const int lanes = std::min(32, s.nthreads - base);
  // Misuse fails the grid; the message is built in a scope that ends before the fiber does.
  char what[160] = "";
  if (!(mask >> lane & 1u)) {
    std::snprintf(what, sizeof what, "mask 0x%08x does not include the calling lane", mask);
  } else if (lanes < 32 && (mask >> lanes) != 0) {
    std::snprintf(what, sizeof what,
                  "mask 0x%08x names lanes beyond the last thread of the block (this warp has "
                  "%d lanes)",
                  mask, lanes);
  } else if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    std::snprintf(what, sizeof what, "width %d is not a power of 2 in [1, 32]", width);
  }
  if (what[0] != '\0') {
    fail(cudaErrorLaunchFailure, true,
         format("%s in %s, warp %d, lane %d (thread (%u, %u, %u)): %s", kind_name(kind),
                where().c_str(), base / 32, lane, t.idx.x, t.idx.y, t.idx.z, what));
    abandon_fiber();
  }
  t.state = State::AtWarp;
  t.kind = kind;
  t.mask = mask;
  t.bits = bits;
  t.operand = operand;
  t.width = width;
  bool complete = true;
  for (int l = 0; l < lanes && complete; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Thread& u = s.threads[base + l];
    complete = u.state == State::AtWarp && u.kind == kind && u.mask == mask;
  }
  if (complete) {
    unsigned ballot = 0;
    for (int l = 0; l < lanes; ++l)
      if ((mask >> l & 1u) && s.threads[base + l].bits != 0) ballot |= 1u << l;
    for (int l = 0; l < lanes; ++l) {
      if (!(mask >> l & 1u)) continue;
      Thread& u = s.threads[base + l];
      switch (kind) {
        case WarpKind::ShflIdx:
        case WarpKind::ShflUp:
        case WarpKind::ShflDown:
        case WarpKind::ShflXor: {
          // PTX shfl.sync: c = ((32 - width) << 8) | clamp; a source lane outside the segment
          // (pval false) or outside the mask gives the lane its own value.
          const int segmask = 32 - u.width;
          const int clamp = kind == WarpKind::ShflUp ? 0 : 31;
          const int max_lane = (l & segmask) | (clamp & ~segmask);
          const int min_lane = l & segmask;
          const int b = u.operand & 31;
          int j = l;
          bool pval = false;
          switch (kind) {
            case WarpKind::ShflUp: j = l - b; pval = j >= max_lane; break;
            case WarpKind::ShflDown: j = l + b; pval = j <= max_lane; break;
            case WarpKind::ShflXor: j = l ^ b; pval = j <= max_lane; break;
            default: j = min_lane | (b & ~segmask); pval = j <= max_lane; break;
          }
          if (!pval || j < 0 || j >= lanes || !(mask >> j & 1u)) j = l;
          u.result = s.threads[base + j].bits;
          break;
        }
        case WarpKind::Ballot: u.result = ballot; break;
        case WarpKind::Any: u.result = ballot != 0; break;
        case WarpKind::All: u.result = ballot == mask; break;
        case WarpKind::SyncWarp: u.result = 0; break;
      }
      u.state = State::Runnable;
    }
  }
  yield_to_scheduler(false);
  return t.result;
}

void* shared_alloc(const void* key, size_t bytes, size_t align, const char* name) {
  Scheduler& s = S();
  current_thread("__shared__ declaration");
  for (const SharedAlloc& a : s.shared)
    if (a.key == key) return a.ptr;
  if (align > 16) {
    fail(cudaErrorLaunchFailure, true,
         format("%s: __shared__ %s needs %zu-byte alignment (at most 16 is emulated)",
                where().c_str(), name, align));
    abandon_fiber();
  }
  if (s.static_bytes + bytes + s.dynamic_bytes > 48 * 1024) {
    // The driver refuses such a launch; here the declaration is only seen when reached.
    fail(cudaErrorInvalidConfiguration, false,
         format("%s: __shared__ %s (%zu bytes) brings the block's shared memory to %zu bytes "
                "static + %zu dynamic, above 48 KiB",
                where().c_str(), name, bytes, s.static_bytes + bytes, s.dynamic_bytes));
    abandon_fiber();
  }
  void* p = ::operator new(bytes, std::align_val_t(16));
  std::memset(p, 0xFF, bytes);
  s.shared.push_back({key, p});
  s.static_bytes += bytes;
  s.stats.shared_bytes_peak = std::max<int64_t>(s.stats.shared_bytes_peak,
                                                static_cast<int64_t>(s.static_bytes +
                                                                     s.dynamic_bytes));
  return p;
}

void* dynamic_shared(size_t align, const char* name) {
  Scheduler& s = S();
  current_thread("extern __shared__ declaration");
  if (align > 16) {
    fail(cudaErrorLaunchFailure, true,
         format("%s: extern __shared__ %s needs %zu-byte alignment (at most 16 is emulated)",
                where().c_str(), name, align));
    abandon_fiber();
  }
  return s.dynamic;
}

void register_cap(void* var, bool is_int64, const char* name, int64_t value) {
  auto& reg = cap_registry();
  auto it = reg.find(name);
  if (it == reg.end()) {
    reg.emplace(name, Cap{{var}, is_int64, value, value});
    return;
  }
  Cap& c = it->second;
  if (c.is_int64 != is_int64 || c.default_value != value)
    throw std::logic_error(std::string("pe_emu::register_cap: cap '") + name +
                           "' registered twice with different types or defaults");
  if (std::find(c.vars.begin(), c.vars.end(), var) == c.vars.end()) c.vars.push_back(var);
}

}  // namespace detail

void set_schedule(Order order, uint64_t seed) {
  std::lock_guard<std::mutex> guard(detail::launch_lock());
  detail::S().order = order;
  detail::S().rng = seed;
}

cudaError_t sticky_error() { return detail::S().sticky; }

void reset_device() {
  std::lock_guard<std::mutex> guard(detail::launch_lock());
  detail::S().sticky = cudaSuccess;
  detail::S().last = cudaSuccess;
  detail::S().message.clear();
}

std::string last_error_message() { return detail::S().message; }

Stats stats() { return detail::S().stats; }
std::map<std::string, int64_t> launch_sites() { return detail::S().sites; }
void reset_stats() {
  detail::S().stats = Stats();
  detail::S().sites.clear();
}

int64_t stack_bytes() { return static_cast<int64_t>(detail::kStackBytes); }

int64_t stack_bytes_peak() {
  // Stacks are fresh zero pages when mapped and never cleared: the lowest non-zero byte is the
  // deepest any fiber went.
  int64_t peak = 0;
  for (const detail::Stack& st : detail::S().stacks) {
#ifdef PE_EMU_ASAN
    __asan_unpoison_memory_region(st.lo, detail::kStackBytes);
#endif
    size_t i = 0;
    while (i < detail::kStackBytes && st.lo[i] == 0) ++i;
    peak = std::max<int64_t>(peak, static_cast<int64_t>(detail::kStackBytes - i));
  }
  return peak;
}

void set_cap(const std::string& name, int64_t value) {
  auto& reg = detail::cap_registry();
  auto it = reg.find(name);
  if (it == reg.end()) {
    std::string known;
    for (const auto& kv : reg) known += (known.empty() ? "" : ", ") + kv.first;
    throw std::invalid_argument("pe_emu::set_cap: unknown cap '" + name + "'; known caps: " +
                                (known.empty() ? "(none registered)" : known));
  }
  if (!it->second.is_int64 && (value < INT32_MIN || value > INT32_MAX))
    throw std::out_of_range("pe_emu::set_cap: cap '" + name + "' is an int; " +
                            std::to_string(value) + " does not fit");
  detail::store_cap(it->second, value);
}

void reset_caps() {
  for (auto& kv : detail::cap_registry()) detail::store_cap(kv.second, kv.second.default_value);
}

std::map<std::string, int64_t> caps() {
  std::map<std::string, int64_t> out;
  for (const auto& kv : detail::cap_registry()) out[kv.first] = kv.second.value;
  return out;
}

}  // namespace pe_emu

// ---- CUDA runtime API ---------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  auto& s = pe_emu::detail::S();
  if (s.sticky != cudaSuccess) return s.sticky;
  const cudaError_t e = s.last;
  s.last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  auto& s = pe_emu::detail::S();
  return s.sticky != cudaSuccess ? s.sticky : s.last;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

// Device asserts end the thread and abort the grid with a sticky cudaErrorAssert, as on a GPU;
// an assert in host code (no fiber running) aborts the process as glibc's does.
extern "C" void pe_emu_assert_fail(const char* assertion, const char* file, unsigned int line,
                                   const char* function) noexcept {
  auto& s = pe_emu::detail::S();
  if (s.current == nullptr) {
    std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
    std::abort();
  }
  const uint3 b = s.block_idx, t = s.current->idx;
  std::fprintf(stderr,
               "%s:%u: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed.\n", file,
               line, function, b.x, b.y, b.z, t.x, t.y, t.z, assertion);
  pe_emu::detail::fail(cudaErrorAssert, true,
                       pe_emu::detail::format("device-side assert triggered in %s, thread (%u, "
                                              "%u, %u): %s:%u: %s: Assertion `%s` failed.",
                                              pe_emu::detail::where().c_str(), t.x, t.y, t.z,
                                              file, line, function, assertion));
  pe_emu::detail::abandon_fiber();
}
