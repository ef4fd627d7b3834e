# resource-slot-sandboxer
GO       ?= go
BIN      := bin
PREFIX   ?= /usr/local
GOTEST   ?= $(GO) test

.PHONY: all build test unit e2e kubelet deps vm-deps guest lint fuzz bench demo install uninstall install-containerd uninstall-containerd clean proto

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# deps installs containerd 2.4.2, ctr, crictl and critest, and kubelet
# v1.36.3 (idempotent).
deps:
	scripts/install-containerd.sh
	scripts/install-kubelet.sh
	scripts/install-test-tools.sh

# The vm backend: libvirtd and virtlogd (started without systemd) and the
# guest (a Debian kernel and a busybox initramfs) in $(GUEST_DIR).
GUEST_DIR ?= $(BIN)/guest

vm-deps:
	scripts/setup-libvirt.sh

guest: vm-deps
	scripts/build-guest.sh $(GUEST_DIR)

# proto regenerates the guest agent's API (agent/api) from agent.proto; the
# generated files are committed, so only a change of the .proto needs it.
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_TTRPC_VERSION := v1.2.9
proto:
	command -v protoc >/dev/null || apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev
	GOBIN=$$($(GO) env GOPATH)/bin $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$$($(GO) env GOPATH)/bin $(GO) install github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@$(PROTOC_GEN_TTRPC_VERSION)
	cd agent/api && PATH="$$PATH:$$($(GO) env GOPATH)/bin" protoc -I. -I/usr/include \
	  --go_out=paths=source_relative:. --go-ttrpc_out=paths=source_relative:. agent.proto

STATICCHECK_VERSION := v0.8.2
STATICCHECK := $(shell $(GO) env GOPATH)/bin/staticcheck

$(STATICCHECK):
	GOBIN=$(dir $(STATICCHECK)) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

lint: $(STATICCHECK)
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

unit:
	$(GOTEST) -race ./...

# e2e drives the sandboxer through a real containerd and crictl (root).
e2e: build deps
	RSS_E2E=1 $(GOTEST) -count=1 -v ./e2e/

# kubelet runs kubelet standalone on static pods against the sandboxer
# (part of e2e and test; root).
kubelet: build deps
	RSS_E2E=1 $(GOTEST) -count=1 -v -run 'TestKubelet' ./e2e/

# fuzz runs each fuzz target briefly; crashers land in testdata/fuzz and
# stay as regression cases.
# A count, not a duration: go1.26 fails a duration-bounded run with a
# spurious "context deadline exceeded" when a worker is mid-call at the
# deadline (golang/go#75804, fixed in go1.27).
FUZZTIME ?= 50000x
FUZZ_TARGETS := resourceinfo:FuzzParseBandwidth resourceinfo:FuzzFromAnnotations \
	resourceinfo:FuzzFromLinuxResources resourceinfo:FuzzFromOCISpec internal/statefile:FuzzReadJSON

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; fn=$${t##*:}; \
	  echo "fuzz $$pkg $$fn ($(FUZZTIME))"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) ./$$pkg/; \
	done

# test is what CI runs: lint, unit tests with the race detector, the
# end-to-end tests against containerd, and a short fuzzing pass.
test: build deps guest lint
	RSS_E2E=1 RSS_VM_TESTS=1 RSS_GUEST_DIR=$(abspath $(GUEST_DIR)) $(GOTEST) -race -count=1 -p 1 -timeout 45m ./...
	$(MAKE) fuzz

bench: build deps guest
	RSS_E2E=1 RSS_VM_TESTS=1 RSS_GUEST_DIR=$(abspath $(GUEST_DIR)) $(GOTEST) -run '^$$' -bench . -benchtime 1x -count=1 -p 1 -timeout 60m ./e2e/ ./vmm/
	$(GOTEST) -run '^$$' -bench . -benchtime 2000x -count=1 ./sandboxer/

demo: build
	scripts/demo.sh

# install puts the binaries in $(PREFIX)/bin, the systemd units, the
# configuration examples and the RuntimeClasses in place, and adds the
# proxy plugins and runtime handlers resource-slot and resource-vm to an
# existing containerd 2.x through a drop-in that its config.toml imports
# (scripts/containerd-dropin; restart containerd afterwards). Twice is
# once; uninstall undoes it, config.toml included. DESTDIR stages it all.
CONTAINERD_CONFIG ?= /etc/containerd/config.toml
CONTAINERD_DROPIN ?= /etc/containerd/conf.d/resource-slot.toml
SLOT_SOCKET       ?= /run/resource-slot-sandboxer.sock
VM_SOCKET         ?= /run/resource-vm-sandboxer.sock
DROPIN_FLAGS = --root "$(DESTDIR)" --config "$(CONTAINERD_CONFIG)" --dropin "$(CONTAINERD_DROPIN)"

install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN)/resource-slot-sandboxer $(BIN)/containerd-shim-resource-slot-v1 $(BIN)/slotctl $(DESTDIR)$(PREFIX)/bin/
	install -d $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/kuasar-resource-slot $(DESTDIR)/etc/kuasar-resource-vm
	for u in kuasar-resource-slot kuasar-resource-vm; do \
	  sed 's|/usr/local/bin/|$(PREFIX)/bin/|g' systemd/$$u.service > $(DESTDIR)/etc/systemd/system/$$u.service && \
	  chmod 0644 $(DESTDIR)/etc/systemd/system/$$u.service || exit 1; \
	done
	install -m 0644 config/resource-slot.toml $(DESTDIR)/etc/kuasar-resource-vm/config.toml.example
	[ -f $(DESTDIR)/etc/kuasar-resource-vm/config.toml ] || \
	  install -m 0600 config/resource-slot.toml $(DESTDIR)/etc/kuasar-resource-vm/config.toml
	install -m 0644 config/resource-slot.toml $(DESTDIR)/etc/kuasar-resource-slot/config.toml.example
	[ -f $(DESTDIR)/etc/kuasar-resource-slot/config.toml ] || \
	  install -m 0600 config/resource-slot.toml $(DESTDIR)/etc/kuasar-resource-slot/config.toml
	install -d $(DESTDIR)/etc/kuasar-resource-slot/k8s
	install -m 0644 runtime-class.yaml $(DESTDIR)/etc/kuasar-resource-slot/k8s/
	$(MAKE) install-containerd

# install-containerd is install's containerd part alone.
install-containerd:
	$(GO) run ./scripts/containerd-dropin install $(DROPIN_FLAGS) \
	  --slot-socket "$(SLOT_SOCKET)" --vm-socket "$(VM_SOCKET)" --shim "$(PREFIX)/bin/containerd-shim-resource-slot-v1"

uninstall-containerd:
	$(GO) run ./scripts/containerd-dropin uninstall $(DROPIN_FLAGS)

# uninstall removes what install added; a daemon configuration that
# differs from the shipped one is the operator's and stays.
uninstall: uninstall-containerd
	rm -f $(DESTDIR)$(PREFIX)/bin/resource-slot-sandboxer $(DESTDIR)$(PREFIX)/bin/containerd-shim-resource-slot-v1 \
	  $(DESTDIR)$(PREFIX)/bin/slotctl
	rm -f $(DESTDIR)/etc/systemd/system/kuasar-resource-slot.service $(DESTDIR)/etc/systemd/system/kuasar-resource-vm.service
	for d in kuasar-resource-slot kuasar-resource-vm; do \
	  rm -f $(DESTDIR)/etc/$$d/config.toml.example; \
	  ! cmp -s config/resource-slot.toml $(DESTDIR)/etc/$$d/config.toml || rm -f $(DESTDIR)/etc/$$d/config.toml; \
	done
	rm -f $(DESTDIR)/etc/kuasar-resource-slot/k8s/runtime-class.yaml
	-rmdir $(DESTDIR)/etc/kuasar-resource-slot/k8s $(DESTDIR)/etc/kuasar-resource-slot $(DESTDIR)/etc/kuasar-resource-vm 2>/dev/null

clean:
	rm -rf $(BIN)
