package cri

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestReleaserAfterLargeResponses(t *testing.T) {
	var calls atomic.Int32
	r := &releaser{free: func() { calls.Add(1) }, delay: time.Millisecond}
	r.after(largeResponse - 1)
	time.Sleep(20 * time.Millisecond)
	assert.Zero(t, calls.Load(), "a small response releases nothing")

	for range 10 {
		r.after(largeResponse)
	}
	assert.Eventually(t, func() bool { return calls.Load() == 1 }, 5*time.Second, time.Millisecond)
	time.Sleep(20 * time.Millisecond)
	assert.Equal(t, int32(1), calls.Load(), "one release for a burst of lists")

	// A list soon after: released again, but releaseEvery after the last.
	r.last.Add(-int64(releaseEvery) + int64(50*time.Millisecond))
	r.after(largeResponse)
	r.after(largeResponse)
	assert.Eventually(t, func() bool { return calls.Load() == 2 }, 5*time.Second, time.Millisecond)
	time.Sleep(20 * time.Millisecond)
	assert.Equal(t, int32(2), calls.Load())
}
