# KVMEM_SANITIZE=address,undefined or thread. Applied to everything we build so that
# instrumented and plain code never mix inside one binary.
if(KVMEM_SANITIZE)
  if(KVMEM_SANITIZE MATCHES "thread" AND KVMEM_SANITIZE MATCHES "address")
    message(FATAL_ERROR "KVMEM_SANITIZE: thread cannot be combined with address")
  endif()
  set(_kvmem_san_flags -fsanitize=${KVMEM_SANITIZE} -fno-omit-frame-pointer)
  if(KVMEM_SANITIZE MATCHES "undefined")
    list(APPEND _kvmem_san_flags -fno-sanitize-recover=undefined)
  endif()
  # Quoted: the flag list must stay inside the generator expression.
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX,C>:${_kvmem_san_flags}>")
  add_link_options(${_kvmem_san_flags})
  add_compile_definitions(KVMEM_SANITIZED=1)
  message(STATUS "kvmem: sanitizers ${KVMEM_SANITIZE}")
endif()

# Fuzzer builds (KVMEM_BUILD_FUZZERS, clang): every library gets coverage instrumentation and
# ASan/UBSan so libFuzzer sees inside the daemon, not just the harness.
if(KVMEM_BUILD_FUZZERS AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX,C>:-fsanitize=fuzzer-no-link,address,undefined;-fno-omit-frame-pointer>")
  add_link_options(-fsanitize=address,undefined)
endif()
