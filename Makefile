# kvmem: the two commands of the quickstart, and a few more for developers.
#   make run    install missing deps, build, start kvmemd in the foreground (embedded defaults)
#   make test   install missing deps, build, run the fast test suite
# Others: make build | test-slow | bench | tsan | asan | format | clean

BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
KVMEMD_ARGS ?=

.PHONY: all deps configure build run test test-slow bench asan tsan format clean

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

asan:
	$(MAKE) BUILD_DIR=build-asan CMAKE_FLAGS="-DKVMEM_SANITIZE=address,undefined -DKVMEM_WITH_CUDA=OFF -DKVMEM_BUILD_BENCHMARKS=OFF" test

tsan:
	$(MAKE) BUILD_DIR=build-tsan CMAKE_FLAGS="-DKVMEM_SANITIZE=thread -DKVMEM_WITH_CUDA=OFF -DKVMEM_BUILD_BENCHMARKS=OFF" build
	# The tests that exercise threads: shared clients, executors, the search pool, the transport.
	ctest --test-dir build-tsan -R 'E2E|ParallelPool|SessionIndex|Malformed' --output-on-failure

format:
	git ls-files '*.h' '*.cc' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD_DIR) build-asan build-tsan
