// Package logsafe shortens what callers send before it is logged: an ID
// or a path from outside can be megabytes, and a log line of megabytes
// per refused call is a denial of service on the log.
package logsafe

import "fmt"

// Max is how many bytes of a value from outside (an ID, a name) are
// logged; MaxError how many of an error message, which may quote them.
const (
	Max      = 128
	MaxError = 1024
)

// String is s, or its first Max bytes and how long it was.
func String(s string) string { return cut(s, Max) }

// Error is err's message, cut at MaxError bytes.
func Error(err error) string {
	if err == nil {
		return ""
	}
	return cut(err.Error(), MaxError)
}

func cut(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	// Do not cut a UTF-8 sequence.
	for cut > 0 && s[cut]&0xC0 == 0x80 {
		cut--
	}
	return fmt.Sprintf("%s…(%d bytes)", s[:cut], len(s))
}
