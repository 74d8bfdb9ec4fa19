// The header from C++: it compiles as C++17 with every warning an error, its types and
// functions have C linkage, and a tiny program links and runs against the library.
// Built and run by ./test.sh (capi/test-c.sh).
#include <userptr.h>

#include <cstdio>
#include <cstring>
#include <type_traits>

static_assert(std::is_standard_layout<userptr_command>::value, "userptr_command is plain data");
static_assert(sizeof(userptr_operand) == 16, "userptr_operand: uint32_t index, uint64_t offset");
static_assert(sizeof(userptr_fence) == 24, "userptr_fence: ring, first, last");
static_assert(std::is_same<std::underlying_type<userptr_code>::type, int32_t>::value,
              "userptr_code is an int32_t");

int main() {
    userptr_driver *drv = nullptr;
    userptr_code rc = userptr_driver_open_reference(&drv);
    if (rc != USERPTR_CODE_OK) {
        std::fprintf(stderr, "open: %s: %s\n", userptr_code_name(rc), userptr_last_error_message());
        return 1;
    }
    userptr_queue *q = nullptr;
    rc = userptr_queue_open(drv, 0, 3, &q);  // not a power of two
    bool ok = rc == USERPTR_CODE_RING_SIZE && q == nullptr &&
              std::strcmp(userptr_code_name(rc), "USERPTR_CODE_RING_SIZE") == 0 &&
              std::strlen(userptr_last_error_message()) > 0;
    userptr_driver_close(drv);
    std::printf("c++ check: %s (userptr %s)\n", ok ? "ok" : "FAILED", userptr_version());
    return ok ? 0 : 1;
}
