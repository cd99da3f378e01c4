// The launcher of the host emulation (see include/cuda_emu.h for the model): runs a grid of blocks,
// each block's threads as fibers on one OS thread, blocks in a chosen order or concurrently.
//
// Entry point for the Rust side: cge_launch (bottom of this file).

#include <stdarg.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

namespace cge {

thread_local ThreadState* tl_thread = nullptr;
thread_local uint3 tl_block_idx = {0, 0, 0};
thread_local uint3 tl_block_dim = {0, 0, 0};
thread_local uint3 tl_grid_dim = {0, 0, 0};

// ---------------------------------------------------------------------------------------------
// Context switch. x86-64 System V: save the callee-saved registers on the old stack, switch stack
// pointers, restore from the new stack. Floating-point control state is the same for every
// fiber (nothing here changes MXCSR or the x87 control word), so it is not saved.

#if defined(__x86_64__)
extern "C" void cge_switch_stack(void** save_sp, void* new_sp);
extern "C" void cge_fiber_trampoline();
asm(R"(
    .text
    .globl cge_switch_stack
    .type cge_switch_stack, @function
cge_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cge_switch_stack, .-cge_switch_stack

    .globl cge_fiber_trampoline
    .type cge_fiber_trampoline, @function
cge_fiber_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cge_fiber_trampoline, .-cge_fiber_trampoline
)");
#define CGE_FAST_SWITCH 1
// A suspended fiber (or scheduler): its saved stack pointer.
typedef void* Context;
// Saves the running context in `save` and resumes `to`.
static inline void jump(Context* save, Context* to) { cge_switch_stack(save, *to); }
#else
#include <ucontext.h>
#define CGE_FAST_SWITCH 0
typedef ucontext_t Context;
static inline void jump(Context* save, Context* to) { swapcontext(save, to); }
#endif

struct Fiber;
struct Block;
static void fiber_main(Fiber* f);

enum class FiberState { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
    ThreadState ts;
    FiberState state = FiberState::Ready;
    Block* block = nullptr;
    unsigned index = 0;         // linear thread index in the block
    uint64_t warp_calls = 0;    // warp-synchronous calls made: picks the exchange slot
    int wait_line = 0;          // call site of the barrier or warp call it waits at
    char* stack_base = nullptr; // lowest usable address
    size_t stack_size = 0;
    Context ctx{};
};

// One warp's exchange buffers: two, used alternately by each lane's successive warp calls, so a
// fast lane that enters its next call cannot overwrite values a slow lane has yet to read.
struct Warp {
    uint64_t slots[2][32];
    unsigned arrived[2] = {0, 0};
    unsigned mask[2] = {0, 0};
    int line[2] = {0, 0};
    unsigned live = 0; // lanes that exist and have not returned
};

// Per-launch settings shared by every worker.
struct Launch {
    void (*call)(void** params);
    void** params;
    unsigned grid;
    unsigned block;
    uint64_t seed;
    bool shuffle_threads;
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;
};

struct Block {
    Launch* launch = nullptr;
    std::vector<Fiber>* fibers = nullptr;
    std::vector<Warp> warps;
    std::vector<unsigned> queue; // runnable fibers, FIFO (ring of capacity n)
    size_t head = 0, count = 0;
    unsigned live = 0;
    unsigned at_barrier = 0;
    int barrier_line = 0;
    std::mt19937_64 rng;
    Context scheduler{}; // run_block's, while the block's fibers run

    void push(unsigned i) {
        queue[(head + count) % queue.size()] = i;
        ++count;
    }
    bool pop(unsigned* i) {
        if (count == 0) return false;
        *i = queue[head];
        head = (head + 1) % queue.size();
        --count;
        return true;
    }
};

// The fibers of the block that this OS thread is running.
static thread_local Block* tl_block = nullptr;
static thread_local Fiber* tl_fiber = nullptr;

static void switch_to(Context* save, Fiber* to);

// ---------------------------------------------------------------------------------------------
// Fiber stacks: one mapping per OS thread, grown on demand, a guard page below each stack so that an
// overflow faults instead of corrupting a neighbour.

static const size_t STACK_SIZE = 256 * 1024;

struct StackPool {
    char* base = nullptr;
    size_t stacks = 0;
    size_t page = 4096;
    size_t slot() const { return STACK_SIZE + page; }
    // Makes room for `n` stacks; call before handing any out (growing remaps them all).
    void reserve(size_t n) {
        if (n > stacks) grow(std::max(n, stacks * 2));
    }
    char* stack(size_t i) const { return base + i * slot() + page; }
    void grow(size_t n) {
        if (base) munmap(base, stacks * slot());
        page = (size_t)sysconf(_SC_PAGESIZE);
        base = (char*)mmap(nullptr, n * slot(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED) {
            fprintf(stderr, "cge: cannot map %zu fiber stacks\n", n);
            abort();
        }
        for (size_t i = 0; i < n; ++i) mprotect(base + i * slot(), page, PROT_NONE);
        stacks = n;
    }
    ~StackPool() {
        if (base) munmap(base, stacks * slot());
    }
};
static thread_local StackPool tl_stacks;
static thread_local std::vector<Fiber> tl_fibers;

// ---------------------------------------------------------------------------------------------
// Errors.

static void record_error(Launch* launch, const std::string& msg) {
    std::lock_guard<std::mutex> g(launch->error_mutex);
    if (launch->error.empty()) launch->error = msg;
    launch->failed.store(true);
}

// Back to the scheduler (the block is over: done, or failed); this fiber is never resumed (its
// stack holds no destructors to run: kernels are plain code).
[[noreturn]] static void leave_block() {
    jump(&tl_fiber->ctx, &tl_block->scheduler);
    __builtin_unreachable();
}

void fail(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    Block* b = tl_block;
    if (!b) {
        fprintf(stderr, "cge: %s (outside a launch)\n", buf);
        abort();
    }
    char where[96];
    snprintf(where, sizeof where, " (block %u, thread %u)", tl_block_idx.x, tl_fiber ? tl_fiber->index : 0u);
    record_error(b->launch, std::string(buf) + where);
    leave_block();
}

// ---------------------------------------------------------------------------------------------
// Scheduling: a fiber that blocks (or ends) hands over to the next runnable fiber of its block; when
// none is left the block is done (every fiber ended) or deadlocked (some wait forever).

static std::string describe_waits(Block* b) {
    std::string s;
    auto& fibers = *b->fibers;
    unsigned shown = 0;
    for (unsigned i = 0; i < b->launch->block && shown < 8; ++i) {
        const Fiber& f = fibers[i];
        if (f.state == FiberState::AtBarrier || f.state == FiberState::AtWarp) {
            char buf[96];
            snprintf(buf, sizeof buf, "%sthread %u at %s (line %d)", shown ? ", " : "", i,
                     f.state == FiberState::AtBarrier ? "__syncthreads" : "a warp call", f.wait_line);
            s += buf;
            ++shown;
        }
    }
    return s;
}

// Nothing can run, yet live threads wait: a barrier or warp call that not every thread reaches.
[[noreturn]] static void deadlock(Block* b) {
    char buf[64];
    snprintf(buf, sizeof buf, "deadlock: %u live threads wait: ", b->live);
    record_error(b->launch, std::string(buf) + describe_waits(b));
    leave_block();
}

// Runs the next runnable fiber; returns when the calling fiber is made runnable and scheduled again.
static void yield_blocked() {
    Block* b = tl_block;
    Fiber* self = tl_fiber;
    unsigned next;
    if (!b->pop(&next)) deadlock(b);
    Fiber* to = &(*b->fibers)[next];
    if (to == self) return;
    switch_to(&self->ctx, to);
}

static void make_ready(Block* b, Fiber* f) {
    f->state = FiberState::Ready;
    b->push(f->index);
}

// Releases every fiber waiting at the barrier once all live ones are there.
static void maybe_release_barrier(Block* b) {
    if (b->at_barrier == 0 || b->at_barrier < b->live) return;
    b->at_barrier = 0;
    auto& fibers = *b->fibers;
    const unsigned n = b->launch->block;
    if (b->launch->shuffle_threads) {
        // Resume in a random order: other interleavings of the code between barriers.
        std::vector<unsigned> order;
        for (unsigned i = 0; i < n; ++i)
            if (fibers[i].state == FiberState::AtBarrier) order.push_back(i);
        std::shuffle(order.begin(), order.end(), b->rng);
        for (unsigned i : order) make_ready(b, &fibers[i]);
    } else {
        for (unsigned i = 0; i < n; ++i)
            if (fibers[i].state == FiberState::AtBarrier) make_ready(b, &fibers[i]);
    }
}

void syncthreads(int line) {
    Block* b = tl_block;
    Fiber* f = tl_fiber;
    if (b->at_barrier > 0 && b->barrier_line != line) {
        fail("__syncthreads at line %d while other threads wait at the one at line %d", line, b->barrier_line);
    }
    b->barrier_line = line;
    f->state = FiberState::AtBarrier;
    f->wait_line = line;
    ++b->at_barrier;
    // When this arrival completes the barrier, every waiting thread (this one too) is queued again;
    // either way the next queued thread runs now.
    maybe_release_barrier(b);
    yield_blocked();
    std::atomic_signal_fence(std::memory_order_seq_cst);
}

const uint64_t* warp_exchange(unsigned mask, uint64_t bits, int line) {
    Block* b = tl_block;
    Fiber* f = tl_fiber;
    const unsigned lane = f->index % 32;
    Warp& w = b->warps[f->index / 32];
    if (!((mask >> lane) & 1u)) fail("lane %u makes a warp call (line %d) with a mask %08x that excludes it", lane, line, mask);
    if (mask & ~w.live) {
        fail("warp call (line %d) with mask %08x names lanes that have returned or do not exist (live lanes %08x)",
             line, mask, w.live);
    }
    // Each lane picks its exchange slot by its own count of warp calls: a call that some live lanes
    // skip (legal on a GPU) would leave the lanes' counts out of step.
    if (w.live & ~mask) {
        fail("partial-mask warp calls are not emulated: the call at line %d has mask %08x, the live lanes are %08x",
             line, mask, w.live);
    }
    const unsigned k = (unsigned)(f->warp_calls++ & 1);
    if (w.arrived[k] == 0) {
        w.mask[k] = mask;
        w.line[k] = line;
    } else if (w.mask[k] != mask || w.line[k] != line) {
        fail("lanes of a warp disagree at a warp call: line %d mask %08x here, line %d mask %08x in other lanes",
             line, mask, w.line[k], w.mask[k]);
    }
    w.slots[k][lane] = bits;
    w.arrived[k] |= 1u << lane;
    f->state = FiberState::AtWarp;
    f->wait_line = line;
    if (w.arrived[k] == mask) {
        w.arrived[k] = 0;
        const unsigned base = f->index - lane;
        for (unsigned l = 0; l < 32; ++l) {
            if ((mask >> l) & 1u) make_ready(b, &(*b->fibers)[base + l]);
        }
    }
    yield_blocked();
    std::atomic_signal_fence(std::memory_order_seq_cst);
    return w.slots[k];
}

static void fiber_main(Fiber* f) {
    Block* b = f->block;
    b->launch->call(b->launch->params);
    // The thread returned.
    f->state = FiberState::Done;
    --b->live;
    Warp& w = b->warps[f->index / 32];
    const unsigned bit = 1u << (f->index % 32);
    w.live &= ~bit;
    for (int k = 0; k < 2; ++k) {
        if (w.arrived[k] != 0 && (w.mask[k] & bit)) {
            fail("a thread returned while its warp waits for it at a warp call (line %d)", w.line[k]);
        }
    }
    maybe_release_barrier(b);
    unsigned next;
    if (!b->pop(&next)) {
        if (b->live != 0) deadlock(b);
        leave_block(); // every thread of the block has returned
    }
    switch_to(&f->ctx, &(*b->fibers)[next]); // never resumed: this thread is done
    __builtin_unreachable();
}

static void switch_to(Context* save, Fiber* to) {
    tl_fiber = to;
    tl_thread = &to->ts;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    jump(save, &to->ctx);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    // Resumed: whoever switched here set tl_fiber to us.
}

#if !CGE_FAST_SWITCH
static void fiber_entry_ucontext(unsigned hi, unsigned lo) {
    fiber_main((Fiber*)(((uintptr_t)hi << 32) | lo));
}
#endif

static void init_fiber(Fiber* f) {
#if CGE_FAST_SWITCH
    // Initial frame as cge_switch_stack pops it: r15, r14, r13 (entry), r12 (argument), rbx, rbp,
    // then the return address (the trampoline). The trampoline starts with a 16-byte aligned stack.
    uintptr_t top = ((uintptr_t)(f->stack_base + f->stack_size)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 72);
    sp[0] = 0;                                // r15
    sp[1] = 0;                                // r14
    sp[2] = (uint64_t)(uintptr_t)&fiber_main; // r13
    sp[3] = (uint64_t)(uintptr_t)f;           // r12
    sp[4] = 0;                                // rbx
    sp[5] = 0;                                // rbp
    sp[6] = (uint64_t)(uintptr_t)&cge_fiber_trampoline;
    f->ctx = sp;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack_base;
    f->ctx.uc_stack.ss_size = f->stack_size;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, (void (*)())fiber_entry_ucontext, 2, (unsigned)((uintptr_t)f >> 32), (unsigned)(uintptr_t)f);
#endif
}

// Runs one block to completion on the calling OS thread.
static void run_block(Launch* launch, unsigned block_index) {
    const unsigned n = launch->block;
    if (tl_fibers.size() < n) tl_fibers.resize(n);
    tl_stacks.reserve(n);
    Block b;
    b.launch = launch;
    b.fibers = &tl_fibers;
    b.warps.resize((n + 31) / 32);
    for (unsigned w = 0; w < b.warps.size(); ++w) {
        const unsigned lanes = std::min(32u, n - w * 32);
        b.warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    }
    b.queue.assign(n, 0);
    b.live = n;
    b.rng.seed(launch->seed * 0x9e3779b97f4a7c15ull + block_index);
    std::vector<unsigned> order(n);
    for (unsigned i = 0; i < n; ++i) order[i] = i;
    if (launch->shuffle_threads) std::shuffle(order.begin(), order.end(), b.rng);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = tl_fibers[i];
        f.state = FiberState::Ready;
        f.block = &b;
        f.index = i;
        f.warp_calls = 0;
        f.ts.thread_idx = uint3{i, 0, 0};
        f.stack_base = tl_stacks.stack(i);
        f.stack_size = STACK_SIZE;
        init_fiber(&f);
        b.push(order[i]);
    }
    tl_block = &b;
    tl_block_idx = uint3{block_index, 0, 0};
    tl_block_dim = uint3{n, 1, 1};
    tl_grid_dim = uint3{launch->grid, 1, 1};
    unsigned first = 0;
    b.pop(&first);
    switch_to(&b.scheduler, &tl_fibers[first]);
    tl_block = nullptr;
    tl_fiber = nullptr;
    tl_thread = nullptr;
}

} // namespace cge

// ---------------------------------------------------------------------------------------------
// The C interface.

extern "C" const cge::KernelEntry* cge_kernel_table(size_t* count); // kernels.cpp

enum CgeOrder : unsigned {
    CGE_IN_ORDER = 0,  // blocks 0, 1, 2, ... on the calling thread
    CGE_REVERSED = 1,  // blocks n-1, ..., 0
    CGE_SHUFFLED = 2,  // a seeded random order, threads of a block resumed in random order too
    CGE_CONCURRENT = 3 // shuffled, taken by `threads` OS threads at once
};

// Runs kernel `name` over `grid` blocks of `block` threads. `signature` must equal the kernel's
// (see ArgToken); `params[i]` points at the i-th argument's value. Returns 0, or 1 with a message in
// `err` when the kernel is unknown, the signature differs, or the kernel failed (deadlock, bad warp
// call, ...).
extern "C" int cge_launch(const char* name, const char* signature, void** params, unsigned grid, unsigned block,
                          unsigned order, unsigned long long seed, unsigned threads, char* err, size_t err_len) {
    auto report = [&](const std::string& msg) {
        if (err_len) {
            snprintf(err, err_len, "%s", msg.c_str());
        }
        return 1;
    };
    size_t count = 0;
    const cge::KernelEntry* table = cge_kernel_table(&count);
    const cge::KernelEntry* entry = nullptr;
    for (size_t i = 0; i < count; ++i) {
        if (strcmp(table[i].name, name) == 0) entry = &table[i];
    }
    if (!entry) return report(std::string("no kernel named ") + name + " in the emulation");
    if (strcmp(entry->signature, signature) != 0) {
        return report(std::string("arguments of ") + name + " do not match its parameters: the host passes (" +
                      signature + "), the kernel takes (" + entry->signature + ")");
    }
    if (grid == 0 || block == 0 || block > 1024) {
        return report(std::string("invalid launch of ") + name + ": grid " + std::to_string(grid) + ", block " +
                      std::to_string(block));
    }
    cge::Launch launch;
    launch.call = entry->call;
    launch.params = params;
    launch.grid = grid;
    launch.block = block;
    launch.seed = seed;
    launch.shuffle_threads = order == CGE_SHUFFLED || order == CGE_CONCURRENT;

    std::vector<unsigned> blocks(grid);
    for (unsigned i = 0; i < grid; ++i) blocks[i] = i;
    if (order == CGE_REVERSED) std::reverse(blocks.begin(), blocks.end());
    if (order == CGE_SHUFFLED || order == CGE_CONCURRENT) {
        std::mt19937_64 rng(seed);
        std::shuffle(blocks.begin(), blocks.end(), rng);
    }
    std::atomic<unsigned> next{0};
    auto worker = [&]() {
        for (;;) {
            if (launch.failed.load()) return;
            const unsigned i = next.fetch_add(1);
            if (i >= grid) return;
            cge::run_block(&launch, blocks[i]);
        }
    };
    if (order == CGE_CONCURRENT && threads > 1 && grid > 1) {
        std::vector<std::thread> pool;
        const unsigned n = std::min(threads, grid);
        for (unsigned t = 0; t < n; ++t) pool.emplace_back(worker);
        for (auto& t : pool) t.join();
    } else {
        worker();
    }
    if (launch.failed.load()) return report(std::string(name) + ": " + launch.error);
    return 0;
}

// The names and signatures of the emulated kernels, for the host side's checks: writes the i-th
// entry's pointers and returns 1, or returns 0 past the end.
extern "C" int cge_kernel_info(size_t i, const char** name, const char** signature) {
    size_t count = 0;
    const cge::KernelEntry* table = cge_kernel_table(&count);
    if (i >= count) return 0;
    *name = table[i].name;
    *signature = table[i].signature;
    return 1;
}
