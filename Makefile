# kvmem: the two commands of the quickstart, and a few more for developers.
#   make run    install missing deps, build, start kvmemd in the foreground (embedded defaults)
#   make test   install missing deps, build, run the fast test suite
#   make asan   ASan + UBSan (clang) build of the whole fast suite, with the libFuzzer targets
#   make fuzz   each libFuzzer target for FUZZ_SECONDS (default 60) on the asan build
#   make tsan   TSan build of the concurrency tests
# Others: make build | test-slow | bench | format | clean

BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
KVMEMD_ARGS ?=

.PHONY: all deps configure build run test test-slow bench asan fuzz tsan format clean

all: build

deps:
	@scripts/install-deps.sh

$(BUILD_DIR)/build.ninja:
	@$(MAKE) --no-print-directory deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

configure: deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

build: deps $(BUILD_DIR)/build.ninja
	cmake --build $(BUILD_DIR) -j $(JOBS)

run: build
	$(BUILD_DIR)/bin/kvmemd $(KVMEMD_ARGS)

test: build
	ctest --test-dir $(BUILD_DIR) -L fast -j $(JOBS) --output-on-failure --no-tests=error

test-slow: build
	ctest --test-dir $(BUILD_DIR) -L slow --output-on-failure

# Sanitized builds use clang (libFuzzer needs it; one build serves the suite and the fuzzers).
# The Python client's test is left out: pip builds its extension unsanitized, and `make test`
# runs it.
# Runtime options, suppressions and UCX_MEM_EVENTS=no are compiled into every executable
# (tests/sanitizers/). Sanitized tests run SAN_JOBS at a time (default 2) with their timeouts
# scaled (tests/CMakeLists.txt).
SAN_JOBS ?= 2
SAN_LABELS ?= fast
ASAN_CMAKE_FLAGS = -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DKVMEM_SANITIZE=address,undefined -DKVMEM_BUILD_FUZZERS=ON -DKVMEM_WITH_CUDA=OFF \
  -DKVMEM_BUILD_BENCHMARKS=OFF -DKVMEM_PYTHON_TESTS=OFF
FUZZ_SECONDS ?= 60

asan:
	$(MAKE) --no-print-directory BUILD_DIR=build-asan CMAKE_FLAGS="$(ASAN_CMAKE_FLAGS)" build
	FUZZ_SECONDS=$(FUZZ_SECONDS) ctest --test-dir build-asan -L '$(SAN_LABELS)' -j $(SAN_JOBS) --output-on-failure --no-tests=error

fuzz:
	$(MAKE) --no-print-directory BUILD_DIR=build-asan CMAKE_FLAGS="$(ASAN_CMAKE_FLAGS)" build
	FUZZ_SECONDS=$(FUZZ_SECONDS) ctest --test-dir build-asan -L fuzz -j $(SAN_JOBS) --output-on-failure --no-tests=error

# The tests that exercise threads: shared clients, executors, the search pool (and the host
# pool's attention on it), the transport, the stress tool against a real kvmemd. Only their
# binaries are built.
TSAN_TARGETS = kvmemd kvmem-stress e2e_test malformed_test session_index_test stress_test limits_test \
  kv_pool_test
TSAN_TESTS = E2E|ParallelPool|HostPool|SessionIndex|Malformed|Stress|Limits
tsan: deps
	cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DCMAKE_C_COMPILER=clang \
	  -DCMAKE_CXX_COMPILER=clang++ -DKVMEM_SANITIZE=thread -DKVMEM_WITH_CUDA=OFF \
	  -DKVMEM_BUILD_BENCHMARKS=OFF -DKVMEM_PYTHON_TESTS=OFF
	cmake --build build-tsan -j $(JOBS) --target $(TSAN_TARGETS)
	ctest --test-dir build-tsan -R '$(TSAN_TESTS)' -j $(SAN_JOBS) --output-on-failure --no-tests=error

format:
	git ls-files '*.h' '*.cc' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD_DIR) build-asan build-tsan
