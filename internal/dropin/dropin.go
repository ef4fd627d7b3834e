// Package dropin adds the sandboxer's proxy plugins and runtime handlers
// to an existing containerd 2.x the way operators extend it: a drop-in
// file that containerd imports (the top-level imports of its config.toml,
// which containerd 2.4's `containerd config default` already points at
// /etc/containerd/conf.d/*.toml), instead of an edited config.toml.
//
// containerd merges an imported file into the main configuration
// (cmd/containerd/server/config LoadConfig, mergeConfig): plugin tables
// key by key, so the drop-in's runtimes join the operator's and change
// nothing else; a proxy plugin of the same name is replaced whole. An
// imported file of an older config version is migrated first, so the
// drop-in says version 3, which every containerd 2.x reads.
//
// Install edits config.toml only when its imports do not cover the
// drop-in already: it adds the drop-in's path to an imports array, or
// adds an imports line, or creates a config.toml that has nothing else
// when there is none (containerd reads no imports without a config
// file). What it changed is recorded next to the drop-in, so that
// Uninstall puts config.toml back as it was, byte for byte. Both are
// idempotent.
package dropin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Options locate the files. Paths are as containerd sees them; Root
// (make's DESTDIR) is prepended to every file this package reads or
// writes, never to a path it writes into a file.
type Options struct {
	Root string
	// Config is containerd's main configuration
	// (/etc/containerd/config.toml).
	Config string
	// Dropin is the drop-in (/etc/containerd/conf.d/resource-slot.toml).
	Dropin string
}

// stateSuffix names the record of what Install changed in config.toml,
// beside the drop-in; it does not end in .toml, so no glob imports it.
const stateSuffix = ".installed"

// state is what Install changed in config.toml.
type state struct {
	// Created: there was no config.toml; Install wrote Content.
	Created bool   `json:"created,omitempty"`
	Content string `json:"content,omitempty"`
	// Before and After: Install replaced the text Before by After.
	Before string `json:"before,omitempty"`
	After  string `json:"after,omitempty"`
}

func (o Options) path(p string) string { return filepath.Join(o.Root, p) }
func (o Options) statePath() string    { return o.path(o.Dropin) + stateSuffix }

// Install writes the drop-in with content and makes config.toml import
// it. It reports what it did, one line per change; nothing when all was
// in place already.
func Install(o Options, content []byte) ([]string, error) {
	if !filepath.IsAbs(o.Config) || !filepath.IsAbs(o.Dropin) {
		return nil, fmt.Errorf("config %q and drop-in %q must be absolute paths", o.Config, o.Dropin)
	}
	if err := checkTOML(content); err != nil {
		return nil, fmt.Errorf("drop-in: %w", err)
	}
	var did []string
	old, err := os.ReadFile(o.path(o.Dropin))
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	if err != nil || !bytes.Equal(old, content) {
		if err := os.MkdirAll(filepath.Dir(o.path(o.Dropin)), 0o755); err != nil {
			return nil, err
		}
		if err := writeFile(o.path(o.Dropin), content, 0o644); err != nil {
			return nil, err
		}
		did = append(did, "wrote "+o.path(o.Dropin))
	}

	cfg, err := os.ReadFile(o.path(o.Config))
	switch {
	case os.IsNotExist(err):
		created := fmt.Sprintf("# Created by resource-slot-sandboxer's make install (make uninstall removes\n# it): containerd reads imports only from a config file.\nversion = 3\nimports = [%s]\n", strconv.Quote(o.Dropin))
		if err := os.MkdirAll(filepath.Dir(o.path(o.Config)), 0o755); err != nil {
			return did, err
		}
		if err := saveState(o, state{Created: true, Content: created}); err != nil {
			return did, err
		}
		if err := writeFile(o.path(o.Config), []byte(created), 0o644); err != nil {
			return did, err
		}
		return append(did, "created "+o.path(o.Config)), nil
	case err != nil:
		return did, err
	}
	covered, err := imports(cfg, o.Config, o.Dropin)
	if err != nil {
		return did, fmt.Errorf("%s: %w", o.path(o.Config), err)
	}
	if covered {
		return did, nil
	}
	start, end, after, err := addImport(string(cfg), o.Dropin)
	if err != nil {
		return did, fmt.Errorf("%s: %w", o.path(o.Config), err)
	}
	before := string(cfg[start:end])
	edited := string(cfg[:start]) + after + string(cfg[end:])
	if ok, err := imports([]byte(edited), o.Config, o.Dropin); err != nil || !ok {
		return did, fmt.Errorf("%s: adding the import failed (%v); add %q to its imports by hand", o.path(o.Config), err, o.Dropin)
	}
	if err := saveState(o, state{Before: before, After: after}); err != nil {
		return did, err
	}
	mode := os.FileMode(0o644)
	if fi, err := os.Stat(o.path(o.Config)); err == nil {
		mode = fi.Mode().Perm()
	}
	if err := writeFile(o.path(o.Config), []byte(edited), mode); err != nil {
		return did, err
	}
	return append(did, fmt.Sprintf("%s: %s", o.path(o.Config), strings.TrimSpace(after))), nil
}

// Uninstall removes the drop-in and undoes what Install changed in
// config.toml. A config.toml edited since in the very place Install
// changed is left alone, with an error saying so.
func Uninstall(o Options) ([]string, error) {
	var did []string
	if err := os.Remove(o.path(o.Dropin)); err == nil {
		did = append(did, "removed "+o.path(o.Dropin))
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	data, err := os.ReadFile(o.statePath())
	if os.IsNotExist(err) {
		return did, nil
	}
	if err != nil {
		return did, err
	}
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		return did, fmt.Errorf("%s: %w", o.statePath(), err)
	}
	cfg, err := os.ReadFile(o.path(o.Config))
	switch {
	case os.IsNotExist(err):
	case err != nil:
		return did, err
	case st.Created && string(cfg) == st.Content:
		if err := os.Remove(o.path(o.Config)); err != nil {
			return did, err
		}
		did = append(did, "removed "+o.path(o.Config))
	case st.Created:
		return did, fmt.Errorf("%s was created by make install but has changed since: left as it is", o.path(o.Config))
	case st.After != "" && strings.Contains(string(cfg), st.After):
		restored := strings.Replace(string(cfg), st.After, st.Before, 1)
		mode := os.FileMode(0o644)
		if fi, err := os.Stat(o.path(o.Config)); err == nil {
			mode = fi.Mode().Perm()
		}
		if err := writeFile(o.path(o.Config), []byte(restored), mode); err != nil {
			return did, err
		}
		did = append(did, fmt.Sprintf("%s: restored %s", o.path(o.Config), strings.TrimSpace(st.Before)))
	default:
		return did, fmt.Errorf("%s changed where make install added %q to its imports: remove it by hand", o.path(o.Config), o.Dropin)
	}
	if err := os.Remove(o.statePath()); err != nil && !os.IsNotExist(err) {
		return did, err
	}
	return did, nil
}

// imports reports whether a containerd configuration imports dropin: an
// entry equal to it or a glob matching it, relative entries resolved
// against the configuration's directory (as resolveImports does).
func imports(cfg []byte, configPath, dropin string) (bool, error) {
	var top struct {
		Imports []string `toml:"imports"`
	}
	if err := toml.Unmarshal(cfg, &top); err != nil {
		return false, fmt.Errorf("not valid TOML: %w", err)
	}
	for _, p := range top.Imports {
		p = filepath.Clean(p)
		if !filepath.IsAbs(p) {
			p = filepath.Join(filepath.Dir(configPath), p)
		}
		if p == dropin {
			return true, nil
		}
		if strings.Contains(p, "*") {
			if ok, err := filepath.Match(p, dropin); err == nil && ok {
				return true, nil
			}
		}
	}
	return false, nil
}

// addImport finds where to add dropin to the configuration's imports and
// returns the span cfg[start:end] to replace and its replacement: the
// top-level imports assignment with dropin appended to its array, or the
// version line followed by a new imports line, or, with neither, the
// first line with a new imports line before it.
func addImport(cfg, dropin string) (start, end int, after string, err error) {
	entry := strconv.Quote(dropin)
	lines := strings.SplitAfter(cfg, "\n")
	offset := 0
	versionLine := -1
	for i, line := range lines {
		t := strings.TrimSpace(line)
		if strings.HasPrefix(t, "[") {
			break // the first table: top-level keys end here
		}
		if key, _, ok := strings.Cut(t, "="); ok {
			switch strings.Trim(strings.TrimSpace(key), `"'`) {
			case "imports":
				open := offset + strings.Index(line, "[")
				if open < offset {
					return 0, 0, "", fmt.Errorf("imports is not an array")
				}
				closing, err := closingBracket(cfg, open)
				if err != nil {
					return 0, 0, "", err
				}
				inner := stripComments(cfg[open+1 : closing])
				sep := ", "
				if strings.TrimSpace(inner) == "" {
					sep = ""
				} else if strings.HasSuffix(strings.TrimRight(inner, " \t\n"), ",") {
					sep = " "
				}
				return offset, closing + 1, cfg[offset:closing] + sep + entry + "]", nil
			case "version":
				versionLine = i
			}
		}
		offset += len(line)
	}
	add := "imports = [" + entry + "]\n"
	if versionLine >= 0 {
		start = 0
		for _, l := range lines[:versionLine] {
			start += len(l)
		}
		v := lines[versionLine]
		if !strings.HasSuffix(v, "\n") {
			v += "\n"
			add = strings.TrimSuffix(add, "\n")
		}
		// The whole line, so that uninstall finds it again.
		return start, start + len(lines[versionLine]), v + add, nil
	}
	return 0, len(lines[0]), add + lines[0], nil
}

// closingBracket finds the "]" that closes the array opening at open,
// skipping strings and comments.
func closingBracket(s string, open int) (int, error) {
	depth := 0
	for i := open; i < len(s); i++ {
		switch c := s[i]; c {
		case '[':
			depth++
		case ']':
			depth--
			if depth == 0 {
				return i, nil
			}
		case '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case '"', '\'':
			for i++; i < len(s) && s[i] != c; i++ {
				if c == '"' && s[i] == '\\' {
					i++
				}
			}
		}
	}
	return 0, errors.New("imports: unterminated array")
}

// stripComments drops the comments of TOML array text.
func stripComments(s string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(s, "\n") {
		if i := strings.Index(line, "#"); i >= 0 && !strings.ContainsAny(line[:i], `"'`) {
			line = line[:i]
		}
		b.WriteString(line)
	}
	return b.String()
}

func checkTOML(data []byte) error {
	var v map[string]any
	return toml.Unmarshal(data, &v)
}

func saveState(o Options, st state) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.statePath()), 0o755); err != nil {
		return err
	}
	return writeFile(o.statePath(), append(data, '\n'), 0o644)
}

// writeFile replaces path atomically: a temp file, synced, renamed over.
func writeFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Content is the drop-in: the proxy plugins of the slot and vm daemons
// and their CRI runtime handlers, whose task shim is shim.
func Content(slotSocket, vmSocket, shim string) []byte {
	var b strings.Builder
	b.WriteString(`# resource-slot-sandboxer, installed by make install (make uninstall removes
# it). containerd imports this file (config.toml: imports) and merges its
# tables into its configuration: two sandbox controllers, and the CRI
# runtime handlers resource-slot and resource-vm that use them (the
# RuntimeClasses of runtime-class.yaml).
version = 3
`)
	for _, h := range []struct{ name, sock string }{{"resource-slot", slotSocket}, {"resource-vm", vmSocket}} {
		fmt.Fprintf(&b, `
[proxy_plugins.%[1]s]
  type = "sandbox"
  address = %[2]s

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[1]s]
  runtime_type = "io.containerd.resource-slot.v1"
  runtime_path = %[3]s
  sandboxer = "%[1]s"
  # The sandboxer needs no pause image.
  disable_pause_image_pull = true
  # The simulation annotations of containers reach the sandboxer.
  container_annotations = ["resource-slot.kuasar.io/*"]
`, h.name, strconv.Quote(h.sock), strconv.Quote(shim))
	}
	return []byte(b.String())
}
