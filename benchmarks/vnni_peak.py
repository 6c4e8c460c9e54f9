"""The machine's measured int8 peak: a timed loop of independent AVX-512 VNNI ``vpdpbusd`` instructions, or
with ``--isa amx`` of AMX ``tdpbusd`` tile instructions.

    python benchmarks/vnni_peak.py [--threads 2] [--seconds 0.3] [--isa vnni|amx]

Compiles the C loop below with gcc and runs it on ``--threads`` pthreads: each thread keeps independent
accumulators (enough to hide the instruction's latency) busy for ``--seconds``. VNNI: ``CHAINS`` zmm
accumulators, 64 MACs per 512-bit ``vpdpbusd`` (64 u8 x s8 products summed into 16 int32 lanes). AMX:
``TILES`` accumulator tiles of 16 x 16 int32, 16384 MACs per ``tdpbusd`` (16 x 64 u8 by 64 x 16 s8), after
asking Linux for the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``). MACs are counted
over each thread's CPU time so that other jobs on the machine do not lower the figure. The best of ``TRIALS``
runs is the peak; the machine's boost clock is in it, the nominal clock of ``/proc/cpuinfo`` is not.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
from pathlib import Path

CHAINS = 12
TILES = 4
TRIALS = 3
ISAS = {"vnni": (CHAINS, 64, "vpdpbusd zmm"), "amx": (TILES, 16384, "tdpbusd tile")}
"""Per instruction set: independent accumulators per thread, MACs per instruction, what each chain runs."""
COMMON = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BLOCK 100000L
#define EACH(X) %(each)s

static double seconds;
static double clock_s(clockid_t id) { struct timespec t; clock_gettime(id, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static double now(void) { return clock_s(CLOCK_MONOTONIC); }

%(loop)s
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    seconds = atof(argv[2]);
    pthread_t t[64];
    double out[64][3], per_cpu_s = 0, per_wall_s = 0;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, loop, out[i]);
    for (int i = 0; i < threads; i++) { pthread_join(t[i], NULL); per_cpu_s += out[i][0]; per_wall_s += out[i][1]; }
    printf("%%.6e %%.6e\n", per_cpu_s, per_wall_s);
    return 0;
}
"""

LOOPS = {
    "vnni": (["-mavx512f", "-mavx512vnni"], r"""
static void *loop(void *out) {
    __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
#define INIT(c) __m512i acc##c = _mm512_set1_epi32(c);
    EACH(INIT)
    long blocks = 0;
    double start = now(), cpu_start = clock_s(CLOCK_THREAD_CPUTIME_ID);
    do {
        for (long i = 0; i < BLOCK; i++) {
#define STEP(c) acc##c = _mm512_dpbusd_epi32(acc##c, a, b);
            EACH(STEP)
            __asm__ volatile("" : "+v"(a));  /* keep the loop from being folded */
        }
        blocks++;
    } while (now() - start < seconds);
    double elapsed = now() - start, cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
    int sink = 0;
#define SINK(c) sink ^= _mm512_reduce_add_epi32(acc##c);
    EACH(SINK)
    ((double *)out)[0] = blocks * BLOCK * %(chains)d * 64.0 / cpu;
    ((double *)out)[1] = blocks * BLOCK * %(chains)d * 64.0 / elapsed;
    ((double *)out)[2] = sink;
    return NULL;
}
"""),
    "amx": (["-mamx-tile", "-mamx-int8"], r"""
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *loop(void *out) {
    struct { unsigned char palette, start_row, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; }
        __attribute__((packed)) config;
    static unsigned char a[16 * 64], b[16 * 64];
    memset(&config, 0, sizeof config);
    memset(a, 1, sizeof a);
    memset(b, 2, sizeof b);
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) exit(3);
    config.palette = 1;
    for (int t = 0; t < 8; t++) { config.colsb[t] = 64; config.rows[t] = 16; }
    _tile_loadconfig(&config);
    _tile_loadd(6, a, 64);
    _tile_loadd(7, b, 64);
#define INIT(c) _tile_zero(c);
    EACH(INIT)
    long blocks = 0;
    double start = now(), cpu_start = clock_s(CLOCK_THREAD_CPUTIME_ID);
    do {
        for (long i = 0; i < BLOCK / 100; i++) {
#define STEP(c) _tile_dpbusd(c, 6, 7);
            EACH(STEP)
        }
        blocks++;
    } while (now() - start < seconds);
    double elapsed = now() - start, cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
    static int sink[16 * 16];
    _tile_stored(0, sink, 64);
    _tile_release();
    ((double *)out)[0] = blocks * (BLOCK / 100) * %(chains)d * 16384.0 / cpu;
    ((double *)out)[1] = blocks * (BLOCK / 100) * %(chains)d * 16384.0 / elapsed;
    ((double *)out)[2] = sink[0];
    return NULL;
}
"""),
}
"""Per instruction set: gcc's flags and the thread's loop."""


def build(folder: Path, isa: str = "vnni") -> Path:
    """The compiled loop of ``isa``, built once per source in ``folder``."""
    flags, loop = LOOPS[isa]
    chains = ISAS[isa][0]
    source = COMMON % {"loop": loop % {"chains": chains}, "each": " ".join(f"X({c})" for c in range(chains))}
    binary = folder / f"{isa}_peak-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    if not binary.exists():
        folder.mkdir(parents=True, exist_ok=True)
        c_file = binary.with_suffix(".c")
        c_file.write_text(source)
        tmp = binary.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", *flags, "-pthread", str(c_file), "-o", str(tmp)],
                       check=True, capture_output=True, text=True)
        tmp.replace(binary)
    return binary


def measure(threads: int = 2, seconds: float = 0.3, folder: Path | None = None, isa: str = "vnni") -> tuple[float, str]:
    """(GMAC/s, how it was measured): the best of ``TRIALS`` runs of the loop, each thread's MACs over
    its own CPU time (what a core does while it runs: other jobs taking turns on it do not lower it)."""
    if not 1 <= threads <= 64:
        raise ValueError(f"threads must be 1 to 64, got {threads}")
    binary = build(folder or Path(tempfile.gettempdir()) / "hawqc-vnni-peak", isa)
    trials = []
    for _ in range(TRIALS):
        run = subprocess.run([str(binary), str(threads), str(seconds)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"the {isa} loop failed (exit status {run.returncode}): this CPU or its kernel does not "
                               f"run {isa.upper()} instructions")
        trials.append([float(v) for v in run.stdout.split()])
    per_cpu_s, per_wall_s = max(trials)
    chains, macs, step = ISAS[isa]
    how = (f"measured: {threads} threads x {chains} independent {step} chains for {seconds} s, {macs} MAC each, "
           f"per thread CPU time, best of {TRIALS}; by wall clock {per_wall_s / 1e9:.0f} GMAC/s")
    return per_cpu_s / 1e9, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--isa", choices=sorted(LOOPS), default="vnni")
    args = parser.parse_args()
    try:
        gmacs, how = measure(args.threads, args.seconds, isa=args.isa)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"vnni_peak: {err}") from None
    print(f"{gmacs:.0f} GMAC/s ({how})")


if __name__ == "__main__":
    main()
