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

# Sanitizer runtime defaults (options, suppression files, UCX_MEM_EVENTS=no) compiled into every
# executable of a sanitized build: tests/sanitizers/sanitizer_defaults.cc. Compiled-in defaults
# reach processes that ctest's ENVIRONMENT would not (kvmemd spawned by a test, a tool started
# from a shell). Call kvmem_link_sanitizer_defaults() once, after every target exists.
function(_kvmem_executables dir out)
  set(found)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  foreach(t IN LISTS targets)
    get_target_property(type ${t} TYPE)
    if(type STREQUAL "EXECUTABLE")
      list(APPEND found ${t})
    endif()
  endforeach()
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(sub IN LISTS subdirs)
    _kvmem_executables(${sub} below)
    list(APPEND found ${below})
  endforeach()
  set(${out} ${found} PARENT_SCOPE)
endfunction()

function(kvmem_link_sanitizer_defaults)
  if(NOT KVMEM_SANITIZE AND NOT KVMEM_BUILD_FUZZERS)
    return()
  endif()
  add_library(kvmem_sanitizer_defaults OBJECT
              ${PROJECT_SOURCE_DIR}/tests/sanitizers/sanitizer_defaults.cc)
  target_compile_definitions(kvmem_sanitizer_defaults PRIVATE
                             KVMEM_SANITIZER_DIR="${PROJECT_SOURCE_DIR}/tests/sanitizers")
  _kvmem_executables(${PROJECT_SOURCE_DIR} executables)
  foreach(exe IN LISTS executables)
    target_sources(${exe} PRIVATE $<TARGET_OBJECTS:kvmem_sanitizer_defaults>)
  endforeach()
endfunction()
