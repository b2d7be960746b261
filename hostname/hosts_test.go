package hostname

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const webEntry = "127.0.1.1\tweb01.example.internal web01"

func TestEditHostsGolden(t *testing.T) {
	inputs, err := filepath.Glob("testdata/hosts/*.in")
	require.NoError(t, err)
	require.NotEmpty(t, inputs)
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".in")
		t.Run(name, func(t *testing.T) {
			content, err := os.ReadFile(in)
			require.NoError(t, err)
			want, err := os.ReadFile(strings.TrimSuffix(in, ".in") + ".golden")
			require.NoError(t, err)

			got, err := EditHosts(content, webEntry)
			require.NoError(t, err)
			assert.Equal(t, string(want), string(got))

			again, err := EditHosts(got, webEntry)
			require.NoError(t, err)
			assert.Equal(t, string(got), string(again), "a second edit changes nothing")

			entry, err := ManagedEntry(got)
			require.NoError(t, err)
			assert.Equal(t, webEntry, entry)
		})
	}
}

func TestEditHostsRefusesBrokenBlocks(t *testing.T) {
	tests := []struct {
		name, content, want string
	}{
		{"a block that is never closed", "127.0.0.1 localhost\n" + beginMarker + "\n127.0.1.1 x\n", "line 2 is never closed"},
		{"an end marker without a begin", "127.0.0.1 localhost\n" + endMarker + "\n", "line 2 has no matching begin marker"},
		{"two blocks", beginMarker + "\n" + endMarker + "\n" + beginMarker + "\n" + endMarker + "\n", "a second"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := EditHosts([]byte(tt.content), webEntry)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// FuzzEditHosts checks the editor's promises on any file: it never panics,
// the result carries the entry, a second edit changes nothing, and removing
// the block gives back the administrator's lines unchanged.
func FuzzEditHosts(f *testing.F) {
	inputs, _ := filepath.Glob("testdata/hosts/*.in")
	for _, in := range inputs {
		data, _ := os.ReadFile(in)
		f.Add(data)
	}
	f.Add([]byte(beginMarker + "\n\n" + endMarker))
	f.Fuzz(func(t *testing.T, content []byte) {
		got, err := EditHosts(content, webEntry)
		if err != nil {
			return
		}
		entry, err := ManagedEntry(got)
		if err != nil || entry != webEntry {
			t.Fatalf("entry after edit = %q, %v", entry, err)
		}
		again, err := EditHosts(got, webEntry)
		if err != nil || !bytes.Equal(again, got) {
			t.Fatalf("second edit changed the file or failed: %v", err)
		}
		if _, err := ManagedEntry(content); err == nil && !bytes.Contains(content, []byte(beginMarker)) {
			if !bytes.Equal(withoutBlock(got), withoutBlock(content)) {
				t.Fatalf("lines outside the block changed:\n%q\n%q", content, got)
			}
		}
	})
}

// withoutBlock drops the managed block and normalises a missing final line
// ending, the one byte the editor may add.
func withoutBlock(b []byte) []byte {
	var out []byte
	in := false
	for _, l := range bytes.SplitAfter(b, []byte("\n")) {
		trimmed := string(bytes.TrimRight(l, " \t\r\n"))
		switch {
		case trimmed == beginMarker:
			in = true
		case trimmed == endMarker && in:
			in = false
		case !in:
			out = append(out, l...)
		}
	}
	out = bytes.TrimRight(out, "\r\n")
	return out
}
