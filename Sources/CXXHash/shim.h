#include <xxhash.h>
#if defined(__x86_64__)
/* The runtime-dispatched entry points (AVX2/AVX-512 where the CPU has them) that
   Debian's libxxhash exports beside the SSE2 baseline ones. */
#include <xxh_x86dispatch.h>
#endif
