package vmm

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if busyboxDir != "" {
		os.RemoveAll(filepath.Dir(busyboxDir)) // the integration tests' busybox rootfs
	}
	os.Exit(code)
}
