package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"
)

// maxLinks bounds the symbolic links one name may go through, as the
// kernel's MAXSYMLINKS does, so that a loop ends in an error.
const maxLinks = 40

// resolve returns name, taken inside r as the kernel's openat2
// RESOLVE_IN_ROOT takes it, as a clean path relative to r with no symbolic
// link in it: a link's absolute target starts again at r, and ".." never
// climbs above r. What does not exist yet is kept as named, so a dangling
// link resolves to the target it names, to be created there. The path
// returned is what the caller then opens through r, which also refuses to
// leave r should a link be swapped in meanwhile.
func resolve(r *os.Root, name string) (string, error) {
	var done []string // each a directory that is not a link, or a name not there
	todo := strings.Split(name, "/")
	links := 0
	for len(todo) > 0 {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(done) > 0 {
				done = done[:len(done)-1]
			}
			continue
		}
		p := path.Join(append(done, c)...)
		fi, err := r.Lstat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			done = append(done, c)
			continue
		case err != nil:
			return "", bare(err)
		case fi.Mode()&fs.ModeSymlink == 0:
			done = append(done, c)
			continue
		}
		if links++; links > maxLinks {
			return "", fmt.Errorf("more than %d symbolic links, a loop: %w", maxLinks, syscall.ELOOP)
		}
		target, err := r.Readlink(p)
		if err != nil {
			return "", bare(err)
		}
		if path.IsAbs(target) {
			done = nil
		}
		todo = append(strings.Split(target, "/"), todo...)
	}
	if len(done) == 0 {
		return ".", nil
	}
	return path.Join(done...), nil
}
