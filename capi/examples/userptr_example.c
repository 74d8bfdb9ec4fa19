/*
 * The C API end to end, on the embedded reference device: register a malloc'd buffer and a
 * stack array, run SAXPY, FILL, COPY and CRC32C through a command ring, check every result
 * against the CPU (SAXPY bit for bit), check that bad input gets error codes, that a DMA fault
 * is reported with its IOVA and access, and that the pins are gone after unregistering.
 *
 *   userptr_example            the above
 *   userptr_example seccomp    and then, with that monitor installed, discard a registered
 *   userptr_example uffd       buffer (madvise(MADV_DONTNEED)) and check that the next FILL
 *                              lands in the pages the process sees
 *
 * Exits 0 and prints "c example: ok" when everything held; else prints what did not and
 * exits 1. Built and run by ./test.sh (capi/test-c.sh), against the shared and the static
 * library through pkg-config.
 */
#define _GNU_SOURCE
#include <userptr.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static int failures;

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, "\n");                                                         \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

/* A call that must succeed; on failure, say why and stop. */
#define MUST(call)                                                                         \
    do {                                                                                   \
        userptr_code rc_ = (call);                                                         \
        if (rc_ != USERPTR_CODE_OK) {                                                      \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,       \
                    userptr_code_name(rc_), userptr_last_error_message());                 \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

/* A call that must fail with `want`, and say why in words. */
#define MUST_FAIL(call, want)                                                              \
    do {                                                                                   \
        userptr_code rc_ = (call);                                                         \
        CHECK(rc_ == (want), "%s returned %s, expected %s (%s)", #call,                    \
              userptr_code_name(rc_), userptr_code_name(want),                             \
              userptr_last_error_message());                                               \
        CHECK(userptr_last_error_code() == rc_, "the last error code is not the result");  \
        CHECK(strlen(userptr_last_error_message()) > 0, "no message for %s", #call);       \
    } while (0)

static uint64_t vm_pin(void) {
    uint64_t n = 0;
    MUST(userptr_process_pinned_bytes(&n));
    return n;
}

/* CRC32C (Castagnoli), bit by bit, as the CPU's reference. */
static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static userptr_command saxpy(float a, uint32_t x, uint32_t y, uint64_t n) {
    userptr_command c = {0};
    c.opcode = USERPTR_OPCODE_SAXPY;
    c.src.index = x;
    c.dst.index = y;
    c.len = n;
    c.a = a;
    return c;
}

static userptr_command fill(uint32_t dst, uint64_t offset, uint64_t len, uint8_t byte) {
    userptr_command c = {0};
    c.opcode = USERPTR_OPCODE_FILL;
    c.dst.index = dst;
    c.dst.offset = offset;
    c.len = len;
    c.arg = byte;
    return c;
}

/* Submit `n` commands naming `refs` and wait for them; returns the wait's code. */
static userptr_code run(userptr_registry *reg, userptr_queue *q, userptr_registration **refs,
                        size_t nrefs, const userptr_command *cmds, size_t n,
                        userptr_completion *out) {
    userptr_fence f;
    userptr_code rc = userptr_submit(reg, q, (const userptr_registration *const *)refs, nrefs,
                                     cmds, n, &f);
    if (rc != USERPTR_CODE_OK)
        return rc;
    return userptr_wait(q, &f, 5000, out, n);
}

/* With a monitor installed, a registered buffer may be discarded while registered: the
 * next command lands in the new pages. */
static void monitored_discard(userptr_registry *reg, userptr_queue *q, uint32_t kind) {
    userptr_monitor *mon = NULL;
    MUST(userptr_monitor_install(reg, kind, &mon));
    const size_t len = 1 << 20;
    uint8_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED, "mmap");
    memset(buf, 0x11, len);
    userptr_registration *r = NULL;
    MUST(userptr_register(reg, buf, len, USERPTR_PERM_READ_WRITE, &r));
    userptr_command c = fill(0, 0, len, 0xab);
    MUST(run(reg, q, &r, 1, &c, 1, NULL));
    CHECK(buf[0] == 0xab && buf[len - 1] == 0xab, "first FILL not seen");
    /* The pages go away; the process now sees fresh zero pages. */
    CHECK(madvise(buf, len, MADV_DONTNEED) == 0, "madvise");
    MUST(userptr_monitor_sync(mon, 5000));
    c = fill(0, 0, len, 0xcd);
    MUST(run(reg, q, &r, 1, &c, 1, NULL));
    size_t stale = 0;
    for (size_t i = 0; i < len; i++)
        stale += buf[i] != 0xcd;
    CHECK(stale == 0, "%zu bytes of the FILL after the discard went to the old pages", stale);
    MUST(userptr_unregister(r));
    munmap(buf, len);
    userptr_monitor_stop(mon);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    const uint64_t pin_start = vm_pin();

    userptr_driver *drv = NULL;
    userptr_queue *q = NULL;
    userptr_registry *reg = NULL;
    MUST(userptr_driver_open_reference(&drv));
    MUST(userptr_queue_open(drv, 0, 64, &q));
    MUST(userptr_registry_new(drv, 0, &reg));
    const uint64_t pin_open = vm_pin();

    /* A malloc'd x and a stack y. */
    enum { N = 4096 };
    float *x = malloc(N * sizeof *x);
    float y[N], want[N];
    const float a = 2.5f;
    for (int i = 0; i < N; i++) {
        x[i] = (float)i * 0.25f - 100.0f;
        y[i] = 1.0f / (float)(i + 1);
        want[i] = a * x[i] + y[i];
    }
    userptr_registration *refs[2] = {NULL, NULL};
    MUST(userptr_register(reg, x, N * sizeof *x, USERPTR_PERM_READ, &refs[0]));
    MUST(userptr_register(reg, y, sizeof y, USERPTR_PERM_READ_WRITE, &refs[1]));
    userptr_command cmd = saxpy(a, 0, 1, N);
    MUST(run(reg, q, refs, 2, &cmd, 1, NULL));
    CHECK(memcmp(y, want, sizeof y) == 0, "SAXPY is not bit for bit what the CPU computes");

    /* FILL the middle of a malloc'd byte buffer, COPY it, CRC32C the copy: one batch. */
    const size_t blen = 3 * 4096 + 100;
    uint8_t *src = malloc(blen), *dst = malloc(blen);
    memset(src, 0x5a, blen);
    memset(dst, 0, blen);
    userptr_registration *brefs[2] = {NULL, NULL};
    MUST(userptr_register(reg, src, blen, USERPTR_PERM_READ_WRITE, &brefs[0]));
    MUST(userptr_register(reg, dst, blen, USERPTR_PERM_READ_WRITE, &brefs[1]));
    userptr_command batch[3] = {fill(0, 100, 5000, 0xab), {0}, {0}};
    batch[1].opcode = USERPTR_OPCODE_COPY;
    batch[1].src.index = 0;
    batch[1].dst.index = 1;
    batch[1].len = blen;
    batch[2].opcode = USERPTR_OPCODE_CRC32C;
    batch[2].src.index = 1;
    batch[2].len = blen;
    userptr_completion done[3];
    MUST(run(reg, q, brefs, 2, batch, 3, done));
    int fill_ok = 1;
    for (size_t i = 0; i < blen; i++)
        fill_ok &= src[i] == ((i >= 100 && i < 5100) ? 0xab : 0x5a);
    CHECK(fill_ok, "FILL wrote outside [100, 5100) or missed a byte");
    CHECK(memcmp(src, dst, blen) == 0, "COPY: the destination differs from the source");
    for (int i = 0; i < 3; i++)
        CHECK(done[i].status == USERPTR_STATUS_OK, "command %d: status %u", i, done[i].status);
    CHECK(done[1].seqno == done[0].seqno + 1 && done[2].seqno == done[1].seqno + 1,
          "completions out of order");
    CHECK(done[2].result == crc32c(0, dst, blen), "CRC32C %#" PRIx64 " != CPU %#x",
          done[2].result, crc32c(0, dst, blen));

    /* Bad input: codes and messages, nothing submitted. */
    userptr_registration *none = NULL;
    userptr_fence f;
    MUST_FAIL(userptr_register(reg, NULL, 4096, USERPTR_PERM_READ, &none), USERPTR_CODE_BAD_ADDRESS);
    MUST_FAIL(userptr_register(reg, x, 0, USERPTR_PERM_READ, &none), USERPTR_CODE_ZERO_LENGTH);
    MUST_FAIL(userptr_register(reg, x, 64, 7, &none), USERPTR_CODE_INVALID_ARGUMENT);
    MUST_FAIL(userptr_register(reg, x, 64, USERPTR_PERM_READ, NULL), USERPTR_CODE_NULL_POINTER);
    MUST_FAIL(userptr_register(NULL, x, 64, USERPTR_PERM_READ, &none), USERPTR_CODE_NULL_POINTER);
    CHECK(none == NULL, "a failed register wrote a handle");
    userptr_command over = fill(1, blen - 10, 11, 0);
    MUST_FAIL(userptr_submit(reg, q, (const userptr_registration *const *)brefs, 2, &over, 1, &f),
              USERPTR_CODE_OPERAND_RANGE);
    userptr_command bad_ref = fill(2, 0, 1, 0);
    MUST_FAIL(userptr_submit(reg, q, (const userptr_registration *const *)brefs, 2, &bad_ref, 1, &f),
              USERPTR_CODE_INVALID_ARGUMENT);
    userptr_command bad_op = {0};
    bad_op.opcode = 99;
    MUST_FAIL(userptr_submit(reg, q, (const userptr_registration *const *)brefs, 2, &bad_op, 1, &f),
              USERPTR_CODE_INVALID_ARGUMENT);
    MUST_FAIL(userptr_queue_open(drv, 0, 64, &q), USERPTR_CODE_RING_BUSY);
    MUST_FAIL(userptr_queue_open(drv, 9, 64, &q), USERPTR_CODE_NO_SUCH_RING);

    /* A device-read-only registration the device writes: a DMA fault, with its IOVA and
     * access, in the completion and in the last error. */
    userptr_registration *ro = NULL;
    MUST(userptr_register(reg, dst, 4096, USERPTR_PERM_READ, &ro));
    uint64_t ro_iova = 0;
    MUST(userptr_registration_iova(ro, &ro_iova));
    userptr_command w = fill(0, 0, 4096, 0xee);
    userptr_completion c;
    MUST_FAIL(run(reg, q, &ro, 1, &w, 1, &c), USERPTR_CODE_DMA_FAULT);
    userptr_fault fault;
    CHECK(userptr_last_error_fault(&fault), "no fault in the last error");
    CHECK(fault.access == USERPTR_ACCESS_WRITE && fault.iova == ro_iova,
          "fault: access %u at %#" PRIx64 ", expected a write at %#" PRIx64, fault.access,
          fault.iova, ro_iova);
    CHECK(c.status == USERPTR_STATUS_DMA_FAULT && c.fault_iova == ro_iova &&
              c.fault_access == USERPTR_ACCESS_WRITE,
          "completion: status %u, access %u at %#" PRIx64, c.status, c.fault_access, c.fault_iova);
    CHECK(dst[0] != 0xee, "the faulted FILL wrote memory");
    MUST(userptr_unregister(ro));

    /* Unregistering drops the pins. */
    for (int i = 0; i < 2; i++) {
        MUST(userptr_unregister(refs[i]));
        MUST(userptr_unregister(brefs[i]));
    }
    uint64_t left = 1;
    MUST(userptr_registry_pinned_bytes(reg, &left));
    CHECK(left == 0, "the registry still pins %" PRIu64 " bytes", left);
    CHECK(vm_pin() == pin_open, "VmPin %" PRIu64 " after unregistering, %" PRIu64 " before",
          vm_pin(), pin_open);

    if (strcmp(mode, "seccomp") == 0)
        monitored_discard(reg, q, USERPTR_MONITOR_KIND_SECCOMP);
    else if (strcmp(mode, "uffd") == 0)
        monitored_discard(reg, q, USERPTR_MONITOR_KIND_UFFD);
    else if (*mode)
        CHECK(0, "unknown mode %s (seccomp or uffd)", mode);

    free(src);
    free(dst);
    free(x);
    userptr_registry_free(reg);
    userptr_queue_close(q);
    userptr_driver_close(drv);
    CHECK(vm_pin() == pin_start, "VmPin %" PRIu64 " at the end, %" PRIu64 " at the start",
          vm_pin(), pin_start);
    if (failures) {
        fprintf(stderr, "c example: %d checks failed\n", failures);
        return 1;
    }
    printf("c example: ok%s%s (SAXPY %d floats, FILL/COPY/CRC32C %zu bytes, a DMA fault, "
           "VmPin back to %" PRIu64 ")\n",
           *mode ? ", monitor " : "", mode, N, blen, pin_start);
    return 0;
}
