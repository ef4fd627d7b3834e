package logsafe

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
)

func TestString(t *testing.T) {
	assert.Equal(t, "abc", String("abc"))
	exact := strings.Repeat("a", Max)
	assert.Equal(t, exact, String(exact))
	long := strings.Repeat("x", 4<<20)
	got := String(long)
	assert.Less(t, len(got), Max+32)
	assert.Contains(t, got, "(4194304 bytes)")
	// A multi-byte rune at the cut stays whole.
	s := strings.Repeat("a", Max-1) + "é" + strings.Repeat("b", 10)
	assert.True(t, utf8.ValidString(String(s)))
	assert.Equal(t, "", Error(nil))
	assert.Less(t, len(Error(errors.New(long))), MaxError+32)
}
