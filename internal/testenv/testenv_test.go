package testenv

import (
	"testing"
)

// recorder is a testing.TB that records how the test would end.
type recorder struct {
	testing.TB
	failed, skipped bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Fatalf(string, ...any) { r.failed = true }
func (r *recorder) Skipf(string, ...any)  { r.skipped = true }
func (r *recorder) Logf(string, ...any)   {}

func TestNeed(t *testing.T) {
	for _, tc := range []struct {
		desc            string
		e2e             string
		ok              bool
		failed, skipped bool
	}{
		{"present", "1", true, false, false},
		{"missing under RSS_E2E fails", "1", false, true, false},
		{"missing without RSS_E2E skips", "", false, false, true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			t.Setenv("RSS_E2E", tc.e2e)
			r := &recorder{TB: t}
			Need(r, tc.ok, "x")
			if r.failed != tc.failed || r.skipped != tc.skipped {
				t.Errorf("failed=%v skipped=%v, want %v %v", r.failed, r.skipped, tc.failed, tc.skipped)
			}
		})
	}
}
