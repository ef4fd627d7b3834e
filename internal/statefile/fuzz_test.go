package statefile

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func FuzzReadJSON(f *testing.F) {
	for _, s := range []string{
		`{"id":"a","count":1,"limit":null,"ratio":0.5,"items":["x"],"inner":{"flag":true,"tags":{"k":"v"}}}`,
		"{}\n",
		`{"id":"a"}}`,
		`{"id":"a"} {"id":"b"}`,
		`{"id":"a","extra":1}`,
		`{"id":"a","count":`,
		`null`,
		"",
		"\x00",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "state.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		var s state
		if err := ReadJSON(path, &s); err != nil {
			return
		}
		// What ReadJSON accepts is exactly one JSON value...
		if !json.Valid(data) {
			t.Fatalf("accepted invalid JSON %q", data)
		}
		// ...that plain decoding reads the same way...
		var plain state
		if err := json.Unmarshal(data, &plain); err != nil {
			t.Fatalf("accepted %q that json.Unmarshal refuses: %v", data, err)
		}
		if !reflect.DeepEqual(s, plain) {
			t.Fatalf("%q: read %+v, json.Unmarshal %+v", data, s, plain)
		}
		// ...and that survives a write and a read.
		out := filepath.Join(dir, "out.json")
		if err := WriteJSON(out, s); err != nil {
			t.Fatalf("write back %+v: %v", s, err)
		}
		var back state
		if err := ReadJSON(out, &back); err != nil {
			t.Fatalf("read back %+v: %v", s, err)
		}
		if !reflect.DeepEqual(s, back) {
			t.Fatalf("round trip of %q: %+v became %+v", data, s, back)
		}
	})
}
