// Package atomicfile replaces files so that a reader, or the next boot after
// a power cut, sees either the old content or the new, never a mix.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// WriteFile replaces path with data: it writes a temporary file in the same
// directory, syncs it, renames it over path and syncs the directory. An
// existing file keeps its mode and owner; a new one gets perm. The directory
// must exist. On error the temporary file is removed and path is untouched.
func WriteFile(path string, data []byte, perm fs.FileMode) (err error) {
	mode, uid, gid := perm, -1, -1
	if fi, err := os.Stat(path); err == nil {
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("write %s: not a regular file", path)
		}
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("write %s: %w", path, err)
	}

	dir := filepath.Dir(path)
	pattern := "." + filepath.Base(path) + ".tmp-*"
	// A power cut in the middle of an earlier write left its temporary
	// file; the write it belonged to is over, one way or the other.
	if stale, _ := filepath.Glob(filepath.Join(dir, pattern)); len(stale) > 0 {
		for _, s := range stale {
			_ = os.Remove(s)
		}
	}
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, bare(err))
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()

	// The mode is set before any byte is written, so key material is never
	// readable by others, not even for an instant.
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("write %s: %w", path, bare(err))
	}
	if uid >= 0 {
		if err := f.Chown(uid, gid); err != nil {
			return fmt.Errorf("write %s: keep owner: %w", path, err)
		}
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, bare(err))
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, bare(err))
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, bare(err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, bare(err))
	}
	return syncDir(dir)
}

// bare strips the temporary file's name from an error about it: the
// caller names the file being replaced, which is the one that matters.
func bare(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
