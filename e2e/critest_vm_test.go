package e2e

import (
	"testing"
)

// TestCritestVM runs the critest (cri-tools v1.36.0) specs that pass in vm
// mode, listed in scripts/critest-pass-vm.txt, against the harness's
// containerd and vm daemon (scripts/critest.sh --reuse --vm: critest's
// image names from the busybox image, the resource-vm handler), and fails
// if any of them does not pass. make critest-vm runs the whole suite; the
// README's vm critest section has its results.
func TestCritestVM(t *testing.T) {
	needVM(t)
	runCritestPassList(t, "critest-pass-vm.txt", "30m", "--vm")
}
