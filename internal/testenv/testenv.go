// Package testenv is for tests that need something of the machine (root,
// a tool): with RSS_E2E set, as CI and make test run them, a missing
// requirement fails the test; without it, the test is skipped.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// Strict reports whether a missing requirement must fail (RSS_E2E set).
func Strict() bool { return os.Getenv("RSS_E2E") != "" }

// Need fails (Strict) or skips tb unless ok, saying why.
func Need(tb testing.TB, ok bool, format string, args ...any) {
	tb.Helper()
	if ok {
		return
	}
	if Strict() {
		tb.Fatalf("RSS_E2E is set and a requirement is missing: "+format, args...)
		return
	}
	tb.Skipf(format, args...)
}

// NeedRoot needs the test to run as root.
func NeedRoot(tb testing.TB) {
	tb.Helper()
	Need(tb, os.Geteuid() == 0, "needs root")
}

// NeedTool needs a command on PATH and returns its path; how says how to
// install it.
func NeedTool(tb testing.TB, name, how string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	Need(tb, err == nil, "%s is not installed (%s)", name, how)
	return p
}
