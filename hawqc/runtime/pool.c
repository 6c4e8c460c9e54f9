/* hawqc's CPU thread pool for the parallel loops of TVM kernels (Linux), linked into every CPU artifact.

   TVM's own pool splits a parallel loop into one static range per thread, so a kernel ends when its slowest
   thread does: a core briefly taken by any other work stalls the whole call. Here a launch is cut into
   `chunks` tasks per thread that the threads claim one at a time (the caller among them), so a thread that
   runs late takes fewer. Idle workers spin for `spin_ns` (the gap between two kernels of one call), then
   sleep on a futex: nothing is left busy once a call has returned. hawqc.runtime.threads points a loaded
   library's `__TVMBackendParallelLaunch` at `hawqc_pool_launch`; the kernels are unchanged (each task
   still computes its range from its id and the task count). Compiles as C and as C++. */

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

#define MAX_WORKERS 255
#define MAX_TASKS 65535

static int used = 1;          /* threads a launch uses, the caller included */
static int chunks = 8;        /* tasks per thread of a launch that leaves the count to the pool */
static int64_t spin_ns = 100000;
static int started = 0;       /* workers created so far (never stopped) */

static uint32_t wake;         /* the current launch's generation: the futex word idle workers sleep on */
static uint64_t claim;        /* generation << 32 | task count << 16 | next task */
static int finished, sleeping, failure;
static FTVMParallelLambda job;
static void* job_data;
static TVMParallelGroupEnv job_env;
static pthread_mutex_t launching = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void relax_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

/* Claim and run tasks of launch `generation` until none is left; the job is read only after a claim
   succeeds, while that launch waits for its tasks, so a late worker never runs a task of another. */
static void run_tasks(uint32_t generation) {
  uint64_t state = __atomic_load_n(&claim, __ATOMIC_ACQUIRE);
  for (;;) {
    uint32_t next = (uint32_t)(state & 0xffff), count = (uint32_t)((state >> 16) & 0xffff);
    if ((uint32_t)(state >> 32) != generation || next >= count) return;
    if (!__atomic_compare_exchange_n(&claim, &state, state + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
    int status = job((int)next, &job_env, job_data);
    if (status) __atomic_store_n(&failure, status, __ATOMIC_RELAXED);
    __atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
    state = __atomic_load_n(&claim, __ATOMIC_ACQUIRE);
  }
}

static void* worker(void* arg) {
  int index = (int)(intptr_t)arg;
  uint32_t seen = __atomic_load_n(&wake, __ATOMIC_ACQUIRE);
  for (;;) {
    int64_t since = now_ns();
    uint32_t current;
    while ((current = __atomic_load_n(&wake, __ATOMIC_ACQUIRE)) == seen) {
      if (now_ns() - since < spin_ns) {
        relax_cpu();
        continue;
      }
      __atomic_fetch_add(&sleeping, 1, __ATOMIC_SEQ_CST);
      syscall(SYS_futex, &wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
      __atomic_fetch_sub(&sleeping, 1, __ATOMIC_SEQ_CST);
      since = now_ns();
    }
    seen = current;
    if (index < __atomic_load_n(&used, __ATOMIC_RELAXED) - 1) run_tasks(current);
  }
  return NULL;
}

/* Threads a launch uses (the caller included), tasks per thread, idle spin before sleeping. */
void hawqc_pool_configure(int threads, int tasks_per_thread, int64_t spin_microseconds) {
  used = threads < 1 ? 1 : (threads > MAX_WORKERS + 1 ? MAX_WORKERS + 1 : threads);
  chunks = tasks_per_thread < 1 ? 1 : tasks_per_thread;
  spin_ns = spin_microseconds < 0 ? 0 : spin_microseconds * 1000;
}

/* TVM's parallel launch: run flambda(task, env, cdata) for every task of the launch; the first nonzero
   status is returned. A launch while another is running (a second calling thread) runs on its caller. */
int hawqc_pool_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int threads = used;
  if (threads == 1 || pthread_mutex_trylock(&launching) != 0) {
    TVMParallelGroupEnv alone = {NULL, 1};
    return flambda(0, &alone, cdata);
  }
  while (started < threads - 1) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, (void*)(intptr_t)started) != 0) break;
    pthread_detach(thread);
    started++;
  }
  int count = num_task > 0 ? num_task : threads * chunks;
  if (count > MAX_TASKS) count = MAX_TASKS;
  uint32_t generation = __atomic_load_n(&wake, __ATOMIC_RELAXED) + 1;
  job = flambda;
  job_data = cdata;
  job_env.sync_handle = NULL;
  job_env.num_task = count;
  __atomic_store_n(&failure, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&finished, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&claim, (uint64_t)generation << 32 | (uint64_t)count << 16, __ATOMIC_RELEASE);
  __atomic_store_n(&wake, generation, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleeping, __ATOMIC_SEQ_CST) > 0)
    syscall(SYS_futex, &wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  run_tasks(generation);
  for (int rounds = 0; __atomic_load_n(&finished, __ATOMIC_ACQUIRE) < count; rounds++) {
    if (rounds < 4096) relax_cpu(); else sched_yield();
  }
  pthread_mutex_unlock(&launching);
  return __atomic_load_n(&failure, __ATOMIC_RELAXED);
}

#ifdef __cplusplus
}
#endif
