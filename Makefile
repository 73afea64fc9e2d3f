# Ferry: build, test and run. `make run` and `make test` do their own setup on Debian 12.
CARGO   ?= cargo
JOBS    ?= 2
# Test binaries run their tests two at a time: each guest test runs a 2-vCPU TCG guest.
TEST_THREADS ?= 2
# The host folder `make run` shares with the guest (mounted at /mnt/share0).
SHARE   ?= $(CURDIR)
FERRY   := target/debug/ferry

# `make bench QUICK=1`: small sizes, a smoke run that every cell gets a number (under 5 min).
QUICK   ?=
BENCH_ARGS := $(if $(QUICK),--quick,)

# `make soak SOAK_MINUTES=N`: the soak (bench/soak.py), 30 minutes by default; not a test.
SOAK_MINUTES ?= 30

# `make fuzz FUZZ_SECS=N`: each fuzz target for N seconds (CI runs 30 as a smoke run).
FUZZ_SECS ?= 600

.PHONY: all deps build test run bench soak fuzz guest-image fmt fmt-check clippy lint clean deb

all: build

deps:
	@bash scripts/install-deps.sh

build:
	$(CARGO) build -j$(JOBS) --workspace

guest-image:
	@bash guest-image/build.sh
	@bash guest-image/build.sh --kernel-lock guest-image/kernel-6.12.lock

# The guest suites that run a second time on QEMU 10 (Debian's bookworm-backports, unpacked
# beside the system's 7.2 by scripts/install-qemu10.sh); every suite runs on 7.2.
QEMU10_SUITES ?= guest_boot guest_net guest_fs guest_fs_queues guest_ports guest_learned guest_ipv6 guest_multiqueue guest_restart guest_reboot guest_pause guest_hotplug launch_conventions libvirt ferry_run
# The guest suites that run a third time, on another guest kernel: Linux 6.12 (Debian's
# bookworm-backports cloud kernel, guest-image/kernel-6.12.lock, built into out-6.12/), which
# sends FUSE's security context as a request extension and spreads requests over several
# virtio-fs request queues. On QEMU 10 only: QEMU 7.2's TCG crashes that kernel in about half
# its boots (oopses in exc_debug_kernel, kmem_cache_alloc), with or without ferry's devices.
KERNEL612_SUITES ?= guest_boot guest_fs guest_fs_queues guest_seclabel guest_ipv6
# Suites run again with every ferry serve in the namespace sandbox (FERRY_TEST_SANDBOX).
NAMESPACE_SUITES ?= guest_fs guest_ports api
QEMU10_PREFIX ?= /opt/ferry/qemu-10

test: deps guest-image
	$(CARGO) build -j$(JOBS) --workspace --all-targets
	$(CARGO) test -j$(JOBS) --workspace -- --test-threads=$(TEST_THREADS)
	@echo "make test: the guest suites again on QEMU 10: $(QEMU10_SUITES)"
	FERRY_QEMU10_PREFIX=$(QEMU10_PREFIX) bash scripts/install-qemu10.sh
	FERRY_QEMU=$(QEMU10_PREFIX)/bin/qemu-system-x86_64 $(CARGO) test -j$(JOBS) -p ferry-tests \
		$(addprefix --test ,$(QEMU10_SUITES)) -- --test-threads=$(TEST_THREADS)
	@echo "make test: the guest suites again on Linux 6.12 (and QEMU 10): $(KERNEL612_SUITES)"
	FERRY_QEMU=$(QEMU10_PREFIX)/bin/qemu-system-x86_64 FERRY_GUEST_DIR=$(CURDIR)/guest-image/out-6.12 \
		$(CARGO) test -j$(JOBS) -p ferry-tests \
		$(addprefix --test ,$(KERNEL612_SUITES)) -- --test-threads=$(TEST_THREADS)
	@echo "make test: suites again under --sandbox namespace: $(NAMESPACE_SUITES)"
	FERRY_TEST_SANDBOX=namespace $(CARGO) test -j$(JOBS) -p ferry-tests \
		$(addprefix --test ,$(NAMESPACE_SUITES)) -- --test-threads=$(TEST_THREADS)

# The demo fetches this checkout from the host's loopback (port 8089) through the NAT and the
# proxy; the server lives as long as the guest.
run: deps guest-image build
	@python3 -m http.server --bind 127.0.0.1 --directory $(SHARE) 8089 >/dev/null 2>&1 & srv=$$!; \
	$(FERRY) run --share $(SHARE) --script guest-image/demo.sh; rc=$$?; kill $$srv; exit $$rc

# Benchmarks are not tests: they measure and write bench/results/, asserting no speed.
bench: guest-image
	@bash scripts/install-deps.sh --bench
	$(CARGO) build -j$(JOBS) --release -p ferry
	python3 bench/bench.py $(BENCH_ARGS)

# The soak: every path under load for SOAK_MINUTES, with host-side bursts; writes bench/soak/.
soak: guest-image
	@bash scripts/install-deps.sh --bench
	$(CARGO) build -j$(JOBS) --release -p ferry
	python3 bench/soak.py --minutes $(SOAK_MINUTES)

# The Debian package (scripts/build-deb.sh): target/debian/ferry_VERSION_ARCH.deb.
deb: deps
	@bash scripts/build-deb.sh

# Fuzzing is not a test either: coverage-guided runs of every decoder (fuzz/, docs/fuzzing.md).
fuzz:
	@bash fuzz/run.sh $(FUZZ_SECS)

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -j$(JOBS) --workspace --all-targets -- -D warnings

lint: fmt-check clippy

clean:
	$(CARGO) clean
	rm -rf guest-image/out guest-image/out-6.12
