/* What sparseopt's C files share: the SIMD paths, their compiler targets and the dispatch rule. */
#ifndef SPARSEOPT_H
#define SPARSEOPT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPARSEOPT_X86 1
#define AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#endif

#define SPARSEOPT_ABI_VERSION 4

/* The code paths, chosen at run time; the caller may ask for a lower one than the CPU's best. */
enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
int sparseopt_best_path(void);

/* Below about this many multiply-adds a kernel takes a few microseconds on one core, and waking
 * the other threads costs as much: no parallel region. */
#define SERIAL_WORK 1000000

#endif
