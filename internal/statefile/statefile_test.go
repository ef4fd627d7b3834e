package statefile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

type inner struct {
	Flag bool              `json:"flag"`
	Tags map[string]string `json:"tags"`
}

type state struct {
	ID      string   `json:"id"`
	Count   int64    `json:"count"`
	Limit   *int64   `json:"limit"`
	Ratio   float64  `json:"ratio"`
	Items   []string `json:"items"`
	Inner   *inner   `json:"inner"`
	Comment string   `json:"comment,omitempty"`
}

// tempFiles lists the temp files left in dir.
func tempFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var temps []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), TempPrefix) {
			temps = append(temps, e.Name())
		}
	}
	return temps
}

func TestWriteReadJSON(t *testing.T) {
	limit := int64(math.MaxInt64)
	for _, tc := range []struct {
		desc string
		in   state
	}{
		{desc: "zero"},
		{desc: "full", in: state{
			ID: "sb-1", Count: 3, Limit: &limit, Ratio: 0.25, Items: []string{"a", "b"},
			Inner: &inner{Flag: true, Tags: map[string]string{"k": "v"}}, Comment: "c",
		}},
		{desc: "unicode and escapes", in: state{ID: "é\u2028\"\\\t<>&", Items: []string{""}}},
		{desc: "empty collections", in: state{Items: []string{}, Inner: &inner{Tags: map[string]string{}}}},
		{desc: "negative", in: state{Count: math.MinInt64, Ratio: -1e300}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			require.NoError(t, WriteJSON(path, tc.in))

			var out state
			require.NoError(t, ReadJSON(path, &out))
			assert.Equal(t, tc.in, out)

			data, err := os.ReadFile(path)
			require.NoError(t, err)
			want, err := EncodeJSON(tc.in)
			require.NoError(t, err)
			assert.Equal(t, string(want), string(data))
			assert.True(t, strings.HasSuffix(string(data), "}\n"), "ends with a newline")
			assert.True(t, json.Valid(data))
			assert.Empty(t, tempFiles(t, filepath.Dir(path)))
		})
	}
}

func TestEncodeJSON(t *testing.T) {
	data, err := EncodeJSON(map[string]any{"b": nil, "a": []int{1}})
	require.NoError(t, err)
	assert.Equal(t, "{\n  \"a\": [\n    1\n  ],\n  \"b\": null\n}\n", string(data))

	_, err = EncodeJSON(make(chan int))
	assert.Error(t, err)
}

func TestFileMode(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		before  os.FileMode // mode of an existing file; 0: none
		durable bool
	}{
		{desc: "new file", durable: true},
		{desc: "new file, not durable"},
		{desc: "replaces a world-readable file", before: 0o644, durable: true},
		{desc: "replaces an executable file", before: 0o755},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.json")
			if tc.before != 0 {
				require.NoError(t, os.WriteFile(path, []byte("{}"), tc.before))
				require.NoError(t, os.Chmod(path, tc.before))
			}
			require.NoError(t, WriteFiles(dir, tc.durable, File{Name: "state.json", Data: []byte("{}\n")}))
			fi, err := os.Stat(path)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(FileMode), fi.Mode().Perm())
			assert.True(t, fi.Mode().IsRegular())
		})
	}

	t.Run("WriteJSON", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "x.json")
		require.NoError(t, WriteJSON(path, state{ID: "x"}))
		fi, err := os.Stat(path)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	})
}

func TestReadJSONRejects(t *testing.T) {
	for _, tc := range []struct {
		desc string
		data string
		want string // in the message
	}{
		{desc: "empty file", data: "", want: "EOF"},
		{desc: "whitespace only", data: " \n\t", want: "EOF"},
		{desc: "unknown field", data: `{"id":"a","extra":1}`, want: `unknown field "extra"`},
		{desc: "unknown nested field", data: `{"inner":{"flag":true,"other":1}}`, want: `unknown field "other"`},
		{desc: "trailing object", data: `{"id":"a"} {"id":"b"}`, want: "trailing data"},
		{desc: "trailing garbage", data: `{"id":"a"}x`, want: "trailing data"},
		{desc: "trailing brace", data: `{"id":"a"}}`, want: "trailing data"},
		{desc: "trailing bracket", data: "{\"id\":\"a\"}\n]", want: "trailing data"},
		{desc: "trailing comma", data: `{"id":"a"},`, want: "trailing data"},
		{desc: "trailing number", data: "{}\n1\n", want: "trailing data"},
		{desc: "truncated object", data: `{"id":"a","count":`, want: "unexpected EOF"},
		{desc: "truncated string", data: `{"id":"a`, want: "unexpected EOF"},
		{desc: "truncated after a field", data: `{"id":"a",`, want: "unexpected EOF"},
		{desc: "half of a real file", data: "{\n  \"id\": \"sb\",\n  \"co", want: "unexpected EOF"},
		{desc: "wrong type", data: `{"count":"3"}`, want: "count"},
		{desc: "number out of range", data: `{"count":9223372036854775808}`, want: "count"},
		{desc: "array at top level", data: `[]`, want: "decode"},
		{desc: "NUL bytes", data: "\x00\x00\x00", want: "invalid character"},
		{desc: "invalid syntax", data: `{id:"a"}`, want: "invalid character"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			require.NoError(t, os.WriteFile(path, []byte(tc.data), 0o600))
			var out state
			err := ReadJSON(path, &out)
			require.Error(t, err, "read %+v", out)
			assert.Contains(t, err.Error(), tc.want)
			assert.Contains(t, err.Error(), path)
		})
	}
}

func TestReadJSONAccepts(t *testing.T) {
	for _, tc := range []struct {
		desc string
		data string
		want state
	}{
		{desc: "trailing newline", data: "{\"id\":\"a\"}\n", want: state{ID: "a"}},
		{desc: "surrounding whitespace", data: " \n {\"id\":\"a\"} \r\n\t ", want: state{ID: "a"}},
		{desc: "null fields", data: `{"limit":null,"inner":null,"items":null}`},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			require.NoError(t, os.WriteFile(path, []byte(tc.data), 0o600))
			var out state
			require.NoError(t, ReadJSON(path, &out))
			assert.Equal(t, tc.want, out)
		})
	}
}

func TestReadJSONMissing(t *testing.T) {
	var out state
	err := ReadJSON(filepath.Join(t.TempDir(), "absent.json"), &out)
	require.Error(t, err)
	assert.True(t, errors.Is(err, fs.ErrNotExist), "error %v", err)
}

func TestFailedWriteKeepsPrevious(t *testing.T) {
	previous := state{ID: "previous", Count: 1}
	for _, tc := range []struct {
		desc  string
		write func(t *testing.T, dir, path string) error
	}{
		{
			desc: "unencodable channel",
			write: func(t *testing.T, dir, path string) error {
				return WriteJSON(path, map[string]any{"id": make(chan int)})
			},
		},
		{
			desc: "unencodable NaN",
			write: func(t *testing.T, dir, path string) error {
				return WriteJSON(path, state{ID: "new", Ratio: math.NaN()})
			},
		},
		{
			desc: "unencodable function",
			write: func(t *testing.T, dir, path string) error {
				return WriteJSON(path, func() {})
			},
		},
		{
			desc: "parent does not exist",
			write: func(t *testing.T, dir, path string) error {
				return WriteJSON(filepath.Join(dir, "missing", "state.json"), state{ID: "new"})
			},
		},
		{
			desc: "rename over a directory",
			write: func(t *testing.T, dir, path string) error {
				target := filepath.Join(dir, "busy")
				require.NoError(t, os.MkdirAll(filepath.Join(target, "child"), 0o700))
				return WriteJSON(target, state{ID: "new"})
			},
		},
		{
			desc: "second file of a batch cannot be created",
			write: func(t *testing.T, dir, path string) error {
				return WriteFiles(dir, true,
					File{Name: filepath.Base(path), Data: []byte(`{"id":"new"}`)},
					File{Name: "missing/other.json", Data: []byte(`{}`)},
				)
			},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.json")
			require.NoError(t, WriteJSON(path, previous))
			before, err := os.ReadFile(path)
			require.NoError(t, err)

			require.Error(t, tc.write(t, dir, path))

			after, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.Equal(t, string(before), string(after))
			var out state
			require.NoError(t, ReadJSON(path, &out))
			assert.Equal(t, previous, out)
			assert.Empty(t, tempFiles(t, dir))
		})
	}
}

func TestWriteFiles(t *testing.T) {
	t.Run("writes each file", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, WriteFiles(dir, true,
			File{Name: "derived.json", Data: []byte("1\n"), Derived: true},
			File{Name: "state.json", Data: []byte("2\n")},
		))
		for name, want := range map[string]string{"derived.json": "1\n", "state.json": "2\n"} {
			data, err := os.ReadFile(filepath.Join(dir, name))
			require.NoError(t, err)
			assert.Equal(t, want, string(data))
		}
		assert.Empty(t, tempFiles(t, dir))
	})

	t.Run("a failed rename leaves the later files and no temp", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "first.json"), []byte("old"), 0o600))
		require.NoError(t, os.WriteFile(filepath.Join(dir, "last.json"), []byte("old"), 0o600))
		require.NoError(t, os.MkdirAll(filepath.Join(dir, "middle", "child"), 0o700))
		err := WriteFiles(dir, true,
			File{Name: "first.json", Data: []byte("new")},
			File{Name: "middle", Data: []byte("new")},
			File{Name: "last.json", Data: []byte("new")},
		)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "middle")
		first, _ := os.ReadFile(filepath.Join(dir, "first.json"))
		last, _ := os.ReadFile(filepath.Join(dir, "last.json"))
		assert.Equal(t, "new", string(first), "renamed before the failure")
		assert.Equal(t, "old", string(last), "the commit point stays old")
		assert.DirExists(t, filepath.Join(dir, "middle", "child"))
		assert.Empty(t, tempFiles(t, dir))
	})

	t.Run("no files", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, WriteFiles(dir, true))
		entries, err := os.ReadDir(dir)
		require.NoError(t, err)
		assert.Empty(t, entries)
	})

	t.Run("missing dir", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "absent")
		require.Error(t, WriteFiles(dir, false, File{Name: "x", Data: nil}))
		assert.NoDirExists(t, dir)
	})

	t.Run("Write in the working directory", func(t *testing.T) {
		t.Chdir(t.TempDir())
		require.NoError(t, Write("relative.json", []byte("{}\n")))
		data, err := os.ReadFile("relative.json")
		require.NoError(t, err)
		assert.Equal(t, "{}\n", string(data))
		assert.Empty(t, tempFiles(t, "."))
	})
}

func TestRemoveTemp(t *testing.T) {
	dir := t.TempDir()
	files := map[string]bool{ // name -> a temp file to remove
		".tmp-state.json-123":          true,
		".tmp-resource_info.json-9":    true,
		".tmp-":                        true,
		"state.json":                   false,
		"resource_info.json":           false,
		"tmp-state.json":               false,
		"state.json.tmp-1":             false,
		".tmpstate":                    false,
		".TMP-state.json-1":            false,
		".tmp":                         false,
		"sandbox-.tmp-not-a-prefix.js": false,
	}
	for name := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600))
	}
	// A directory named like a temp file is not a temp file.
	require.NoError(t, os.Mkdir(filepath.Join(dir, ".tmp-dir"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".tmp-dir", ".tmp-inner"), []byte("x"), 0o600))
	// Nor is a symlink.
	require.NoError(t, os.Symlink("state.json", filepath.Join(dir, ".tmp-link")))

	removed, err := RemoveTemp(dir)
	require.NoError(t, err)
	var want []string
	for name, temp := range files {
		if temp {
			want = append(want, name)
		}
	}
	slices.Sort(want)
	assert.Equal(t, want, removed)

	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var left []string
	for _, e := range entries {
		left = append(left, e.Name())
	}
	for name, temp := range files {
		if temp {
			assert.NotContains(t, left, name)
		} else {
			assert.Contains(t, left, name)
		}
	}
	assert.Contains(t, left, ".tmp-dir")
	assert.Contains(t, left, ".tmp-link")
	assert.FileExists(t, filepath.Join(dir, ".tmp-dir", ".tmp-inner"))

	// Nothing left to remove.
	removed, err = RemoveTemp(dir)
	require.NoError(t, err)
	assert.Empty(t, removed)

	_, err = RemoveTemp(filepath.Join(dir, "absent"))
	assert.True(t, errors.Is(err, fs.ErrNotExist), "error %v", err)
}

// TestRemoveTempAfterInterruptedWrite: the temp file an interrupted write
// leaves is what RemoveTemp removes.
func TestRemoveTempAfterInterruptedWrite(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, WriteJSON(filepath.Join(dir, "state.json"), state{ID: "a"}))
	tmp, err := writeTemp(dir, "state.json", []byte(`{"id":`), false)
	require.NoError(t, err)
	require.FileExists(t, tmp)

	removed, err := RemoveTemp(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Base(tmp)}, removed)
	var out state
	require.NoError(t, ReadJSON(filepath.Join(dir, "state.json"), &out))
	assert.Equal(t, "a", out.ID)
}

func TestSyncDir(t *testing.T) {
	require.NoError(t, SyncDir(t.TempDir()))
	t.Chdir(t.TempDir())
	require.NoError(t, SyncDir(""))
	assert.Error(t, SyncDir(filepath.Join(t.TempDir(), "absent")))
}

func TestConcurrentWriters(t *testing.T) {
	const (
		writers = 20
		writes  = 50
	)
	for _, durable := range []bool{true, false} {
		t.Run(fmt.Sprintf("durable=%v", durable), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.json")
			require.NoError(t, WriteJSON(path, state{ID: "initial"}))

			// Big enough that a torn write would show.
			items := make([]string, 200)
			for i := range items {
				items[i] = strings.Repeat("x", 50)
			}

			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				errs    []error
				done    = make(chan struct{})
				readers sync.WaitGroup
			)
			record := func(err error) {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
			// Readers always see a complete file.
			for range 4 {
				readers.Add(1)
				go func() {
					defer readers.Done()
					for {
						select {
						case <-done:
							return
						default:
						}
						var out state
						if err := ReadJSON(path, &out); err != nil {
							record(fmt.Errorf("read: %w", err))
							return
						}
						if out.ID != "initial" && len(out.Items) != len(items) {
							record(fmt.Errorf("read %q with %d items", out.ID, len(out.Items)))
							return
						}
					}
				}()
			}
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range writes {
						s := state{ID: fmt.Sprintf("w%d-%d", w, i), Count: int64(i), Items: items}
						data, err := EncodeJSON(s)
						if err == nil {
							err = WriteFiles(dir, durable, File{Name: "state.json", Data: data})
						}
						if err != nil {
							record(fmt.Errorf("write: %w", err))
							return
						}
					}
				}()
			}
			wg.Wait()
			close(done)
			readers.Wait()
			require.Empty(t, errs)

			var out state
			require.NoError(t, ReadJSON(path, &out))
			var w, i int
			_, err := fmt.Sscanf(out.ID, "w%d-%d", &w, &i)
			require.NoError(t, err, "id %q", out.ID)
			assert.Equal(t, int64(i), out.Count)
			assert.Len(t, out.Items, len(items))
			assert.Empty(t, tempFiles(t, dir))
		})
	}
}

func TestReplaceSwapsWithTheSpare(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "info.json")
	spare := filepath.Join(dir, SpareName("info.json"))
	ino := func(path string) uint64 {
		t.Helper()
		var st unix.Stat_t
		require.NoError(t, unix.Stat(path, &st))
		return st.Ino
	}

	require.NoError(t, Replace(dir, "info.json", []byte("first, the longest")))
	assert.NoFileExists(t, spare, "a new file is renamed into place")
	first := ino(target)

	require.NoError(t, Replace(dir, "info.json", []byte("second")))
	data, err := os.ReadFile(target)
	require.NoError(t, err)
	assert.Equal(t, "second", string(data))
	data, err = os.ReadFile(spare)
	require.NoError(t, err)
	assert.Equal(t, "first, the longest", string(data), "the spare holds the previous content")
	assert.Equal(t, first, ino(spare))
	second := ino(target)

	require.NoError(t, Replace(dir, "info.json", []byte("third")))
	data, err = os.ReadFile(target)
	require.NoError(t, err)
	assert.Equal(t, "third", string(data), "written over the spare and cut to its length")
	assert.Equal(t, first, ino(target), "the spare's inode is reused")
	assert.Equal(t, second, ino(spare))
	assert.Empty(t, tempFiles(t, dir))

	// A spare removed meanwhile is made again.
	require.NoError(t, os.Remove(spare))
	require.NoError(t, Replace(dir, "info.json", []byte("fourth")))
	data, err = os.ReadFile(target)
	require.NoError(t, err)
	assert.Equal(t, "fourth", string(data))
}
