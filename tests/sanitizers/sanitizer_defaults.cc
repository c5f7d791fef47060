// Linked into every executable of a sanitized build (KVMEM_SANITIZE or KVMEM_BUILD_FUZZERS;
// cmake/Sanitizers.cmake), so tests, kvmemd and the tools run under the same options wherever
// they are started from: ctest, a test that spawns kvmemd, or a shell. Environment variables
// (ASAN_OPTIONS, LSAN_OPTIONS, UBSAN_OPTIONS, TSAN_OPTIONS) still override these.
//
// The suppression files live beside this file, one reason per entry; KVMEM_SANITIZER_DIR is
// their absolute path in the source tree.
#include <cstdlib>

#ifndef KVMEM_SANITIZER_DIR
#error "KVMEM_SANITIZER_DIR must name tests/sanitizers"
#endif

namespace {

// UCX's memory hooks (UCX_MEM_EVENTS) patch mmap/munmap/brk/shmat relocations to track
// registered memory; ASan and TSan intercept the same functions, and with both in place UCX 1.13
// can crash or hang. kvmem registers no user memory with UCX, so it needs no memory events.
// UCM reads the variable when libucs loads, before this constructor runs, so setting it here
// reaches the processes this one starts (kvmemd spawned by a test), not this one: ctest sets it
// for the test processes (tests/CMakeLists.txt); set it yourself for a sanitized kvmemd started
// by hand. An explicit setting in the environment wins.
__attribute__((constructor)) void NoUcxMemoryHooksUnderSanitizers() {
  setenv("UCX_MEM_EVENTS", "no", /*overwrite=*/0);
}

}  // namespace

extern "C" {

// Each returns a static string: the runtimes read them before main().
__attribute__((visibility("default"), used)) const char* __asan_default_options() {
  // detect_leaks: LeakSanitizer at exit (the default on Linux, stated here on purpose).
  // check_initialization_order / strict_init_order: static-init-order bugs are real bugs.
  return "detect_leaks=1:check_initialization_order=1:strict_init_order=1:"
         "print_suppressions=0";
}

__attribute__((visibility("default"), used)) const char* __lsan_default_options() {
  return "print_suppressions=0:suppressions=" KVMEM_SANITIZER_DIR "/lsan.supp";
}

__attribute__((visibility("default"), used)) const char* __ubsan_default_options() {
  // A UBSan report fails the process (the build also uses -fno-sanitize-recover=undefined).
  return "print_stacktrace=1:halt_on_error=1:suppressions=" KVMEM_SANITIZER_DIR "/ubsan.supp";
}

__attribute__((visibility("default"), used)) const char* __tsan_default_options() {
  return "halt_on_error=0:second_deadlock_stack=1:suppressions=" KVMEM_SANITIZER_DIR
         "/tsan.supp";
}

}  // extern "C"
