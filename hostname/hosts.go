package hostname

import (
	"bytes"
	"fmt"
)

// The markers around the managed entry in /etc/hosts. Everything outside
// them is the administrator's and is kept byte for byte.
const (
	beginMarker = "# BEGIN bootagent: the host's own name; this block is rewritten"
	endMarker   = "# END bootagent"
)

// localhostLines are what a new /etc/hosts starts with, as Debian's netbase
// and cloud-init's templates write it: localhost must resolve, over IPv4 and
// IPv6, on any host.
const localhostLines = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

// EditHosts returns the content of an /etc/hosts file with the managed block
// holding entry. An existing block is replaced where it stands; a new one
// goes right after the 127.0.0.1 line, or at the end. The file's line ending
// (LF or CRLF) is kept. A block without its end marker is refused rather than
// guessed at.
func EditHosts(content []byte, entry string) ([]byte, error) {
	lines := bytes.SplitAfter(content, []byte("\n"))
	begin, end, err := findBlock(lines)
	if err != nil {
		return nil, err
	}
	// An existing block keeps its own line ending; a new one takes the
	// file's, as its first line shows it.
	eol := []byte("\n")
	if first := lines[max(begin, 0)]; bytes.HasSuffix(first, []byte("\r\n")) {
		eol = []byte("\r\n")
	}
	var block bytes.Buffer
	for _, l := range []string{beginMarker, entry, endMarker} {
		block.WriteString(l)
		block.Write(eol)
	}
	var out bytes.Buffer
	out.Grow(len(content) + block.Len())
	switch {
	case begin >= 0:
		writeLines(&out, lines[:begin])
		out.Write(block.Bytes())
		writeLines(&out, lines[end+1:])
	default:
		at := len(lines)
		for i, l := range lines {
			if firstField(l) == "127.0.0.1" {
				at = i + 1
				break
			}
		}
		writeLines(&out, lines[:at])
		if out.Len() > 0 && !bytes.HasSuffix(out.Bytes(), []byte("\n")) {
			out.Write(eol)
		}
		out.Write(block.Bytes())
		writeLines(&out, lines[at:])
	}
	return out.Bytes(), nil
}

// ManagedEntry returns the entry inside the managed block, or "" when there
// is no block.
func ManagedEntry(content []byte) (string, error) {
	lines := bytes.SplitAfter(content, []byte("\n"))
	begin, end, err := findBlock(lines)
	if err != nil || begin < 0 {
		return "", err
	}
	var entry []byte
	for _, l := range lines[begin+1 : end] {
		entry = append(entry, l...)
	}
	return string(bytes.TrimRight(entry, "\r\n")), nil
}

// findBlock returns the line indexes of the markers, or -1, -1.
func findBlock(lines [][]byte) (int, int, error) {
	begin, end := -1, -1
	for i, l := range lines {
		switch string(bytes.TrimRight(l, " \t\r\n")) {
		case beginMarker:
			if begin >= 0 {
				return 0, 0, fmt.Errorf("hosts file: a second %q on line %d; remove one block", beginMarker, i+1)
			}
			begin = i
		case endMarker:
			if begin < 0 || end >= 0 {
				return 0, 0, fmt.Errorf("hosts file: %q on line %d has no matching begin marker; remove it", endMarker, i+1)
			}
			end = i
		}
	}
	if begin >= 0 && end < 0 {
		return 0, 0, fmt.Errorf("hosts file: %q on line %d is never closed; remove it or add %q", beginMarker, begin+1, endMarker)
	}
	return begin, end, nil
}

func writeLines(b *bytes.Buffer, lines [][]byte) {
	for _, l := range lines {
		b.Write(l)
	}
}

// firstField returns the first whitespace-separated field of a line.
func firstField(l []byte) string {
	f := bytes.Fields(l)
	if len(f) == 0 {
		return ""
	}
	return string(f[0])
}
