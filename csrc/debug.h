/* Internal asserts of the native core. They compile out unless the build
 * defines MMENGINE_DEBUG=1 (MMENGINE_BUILD_DEBUG=1 pip install -e .). */
#ifndef MMENGINE_DEBUG_H
#define MMENGINE_DEBUG_H

#ifndef MMENGINE_DEBUG
#define MMENGINE_DEBUG 0
#endif

#if MMENGINE_DEBUG
#include <stdio.h>
#include <stdlib.h>
#define MM_ASSERT(cond)                                                       \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "mmengine: assertion failed: %s (%s:%d)\n",      \
                    #cond, __FILE__, __LINE__);                               \
            abort();                                                          \
        }                                                                     \
    } while (0)
#else
#define MM_ASSERT(cond) ((void)0)
#endif

#endif
