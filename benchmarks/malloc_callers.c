/* LD_PRELOAD counter of small mallocs (<= 64 bytes) by call stack, for benchmarks/malloc_callers.py:
   `counting` switches it on, `dump(path, min_hits)` writes each stack seen at least min_hits times. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static void *(*real_malloc)(size_t) = 0;
int counting = 0;
static __thread int inside = 0;
#define MAXS 4096
#define DEPTH 10
static void *stacks[MAXS][DEPTH];
static unsigned long hits[MAXS];
static int nstacks = 0;
unsigned long total = 0;
void *malloc(size_t n) {
    if (!real_malloc) real_malloc = dlsym(RTLD_NEXT, "malloc");
    void *p = real_malloc(n);
    if (counting && !inside && n <= 64) {
        inside = 1;
        total++;
        void *bt[DEPTH + 1];
        int k = backtrace(bt, DEPTH + 1);
        void *key[DEPTH] = {0};
        for (int i = 1; i < k && i <= DEPTH; i++) key[i - 1] = bt[i];
        int j;
        for (j = 0; j < nstacks; j++) if (!memcmp(stacks[j], key, sizeof key)) break;
        if (j == nstacks && nstacks < MAXS) { memcpy(stacks[nstacks], key, sizeof key); nstacks++; }
        if (j < MAXS) hits[j]++;
        inside = 0;
    }
    return p;
}
void dump(const char *path, unsigned long min_hits) {
    inside = 1;
    FILE *f = fopen(path, "w");
    for (int j = 0; j < nstacks; j++) {
        if (hits[j] < min_hits) continue;
        fprintf(f, "== %lu\n", hits[j]);
        char **names = backtrace_symbols(stacks[j], DEPTH);
        for (int i = 0; i < DEPTH; i++) if (stacks[j][i]) fprintf(f, "  %s\n", names[i]);
        free(names);
    }
    fclose(f);
    inside = 0;
}
