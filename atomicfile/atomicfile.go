// Package atomicfile writes the files the agent manages, every one of them
// under the agent's root directory (/ in production, any directory when
// trying it out or in tests): a reader, or the next boot after a power cut,
// sees the old content or the new, never a mix; and no symbolic link leads
// a write, a removal or a lock out of the root.
//
// Names are taken inside the root as if it were "/": a link's absolute
// target starts again at the root and ".." stops there, as openat2's
// RESOLVE_IN_ROOT does (see resolve). A symlinked file is thus written
// through to its target inside the root, which keeps its owner and mode,
// and the link stays a link. The work is then done through an os.Root on
// the path so resolved, which refuses to leave the root should a link be
// swapped in meanwhile.
package atomicfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// dirPerm is the mode of the directories made for a file: those the agent
// writes in (/etc, /etc/chef, /var/lib/bootagent) are world-readable on
// every distribution.
const dirPerm = 0o755

// WriteFile replaces the file name under root with data: it writes a
// temporary file in the same directory, syncs it, renames it over the file
// and syncs the directory. An existing file keeps its mode and owner,
// unless perm lets only the owner in (a secret): then it gets perm and the
// writer as owner. A new one gets perm, and the directories missing above
// it are made. On error
// the temporary file is removed and the file is untouched.
//
// A file that is a mount point (a bind-mounted /etc/hosts in a container)
// cannot be renamed over: it is rewritten in place instead, as glibc's
// tools and cloud-init do, and a reader, or an error while writing, may
// then leave a mix. WriteFile reports whether it did that, for the caller
// to say so.
func WriteFile(root, name string, data []byte, perm fs.FileMode) (inPlace bool, err error) {
	err = do("write", root, name, func(r *os.Root, rel string) (err error) {
		inPlace, err = write(r, rel, data, perm)
		return err
	})
	return inPlace, err
}

// write is WriteFile on rel, a path in r without links.
func write(r *os.Root, rel string, data []byte, perm fs.FileMode) (bool, error) {
	mode, uid, gid := perm, -1, -1
	switch fi, err := r.Lstat(rel); {
	case err == nil:
		if !fi.Mode().IsRegular() {
			return false, errors.New("not a regular file")
		}
		if done, err := rewriteKnownMountPoint(r, rel, data); done || err != nil {
			return done, err
		}
		if perm&0o077 == 0 {
			// A secret (a key) keeps the mode asked for and gets the
			// writer as owner, whatever the file it replaces had: a
			// damaged key left 0644, or owned by a user, must not make
			// the new one readable by others.
			break
		}
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return false, bare(err)
	}

	dir := path.Dir(rel)
	if err := mkdirAll(r, dir); err != nil {
		return false, bare(err)
	}
	removeStale(r, dir, path.Base(rel))
	f, tmp, err := createTemp(r, dir, path.Base(rel))
	if err != nil {
		return false, bare(err)
	}
	done := false
	defer func() {
		if !done {
			_ = f.Close()
			_ = r.Remove(tmp)
		}
	}()

	// The mode is set before any byte is written, so key material is never
	// readable by others, not even for an instant.
	if err := f.Chmod(mode); err != nil {
		return false, bare(err)
	}
	if uid >= 0 {
		if err := f.Chown(uid, gid); err != nil {
			return false, fmt.Errorf("keep owner: %w", bare(err))
		}
	}
	if _, err := f.Write(data); err != nil {
		return false, bare(err)
	}
	if err := f.Sync(); err != nil {
		return false, bare(err)
	}
	if err := f.Close(); err != nil {
		return false, bare(err)
	}
	switch err := r.Rename(tmp, rel); {
	case errors.Is(err, syscall.EBUSY):
		if err := rewriteMountPoint(r, rel, data, err); err != nil {
			return false, err
		}
		return true, nil
	case err != nil:
		return false, bare(err)
	}
	done = true
	return false, syncDir(r, dir)
}

// mkdirAll makes dir and the directories missing above it, each dirPerm
// whatever the umask (the agent's unit sets 0077).
func mkdirAll(r *os.Root, dir string) error {
	if dir == "." {
		return nil
	}
	if fi, err := r.Stat(dir); err == nil {
		if !fi.IsDir() {
			return &fs.PathError{Op: "mkdir", Path: dir, Err: syscall.ENOTDIR}
		}
		return nil
	}
	if err := mkdirAll(r, path.Dir(dir)); err != nil {
		return err
	}
	if err := r.Mkdir(dir, dirPerm); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil
		}
		return err
	}
	return r.Chmod(dir, dirPerm)
}

// createTemp makes an empty temporary file for base in dir, readable by
// nobody else. os.Root has no CreateTemp; O_EXCL makes sure it is new and
// never a link.
func createTemp(r *os.Root, dir, base string) (*os.File, string, error) {
	for i := 0; ; i++ {
		tmp := path.Join(dir, "."+base+".tmp-"+strconv.FormatUint(uint64(rand.Uint32()), 10))
		f, err := r.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) && i < 100 {
			continue
		}
		return f, tmp, err
	}
}

// removeStale removes the temporary files an earlier write of base left
// when the power was cut: the write they belonged to is over, one way or
// the other.
func removeStale(r *os.Root, dir, base string) {
	d, err := r.Open(dir)
	if err != nil {
		return
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	for _, n := range names {
		if ok, _ := path.Match("."+base+".tmp-*", n); ok {
			_ = r.Remove(path.Join(dir, n))
		}
	}
}

// rewriteMountPoint writes data into the file rel itself, when renaming
// over it failed with busy (renameErr) because it is a mount point: the
// data is written from the start, the file cut to its length and synced.
// When it is no mount point, rename(2) had another reason to be busy,
// which rewriting would not cure, and renameErr is returned.
func rewriteMountPoint(r *os.Root, rel string, data []byte, renameErr error) error {
	f, err := openNoFollow(r, rel, os.O_WRONLY, 0)
	if err != nil {
		return bare(err)
	}
	defer f.Close()
	if mp, err := isMountPoint(f); err != nil || !mp {
		return bare(renameErr)
	}
	return rewriteInPlace(f, data)
}

// rewriteKnownMountPoint rewrites rel in place, before any temporary file
// is made, when the kernel says it is the root of a mount: nothing can be
// renamed over it, and making the temporary file its owner could fail
// first (an owner a container's user namespace does not map). It reports
// whether it did. A kernel older than 5.8 cannot say; the rename's EBUSY
// tells then.
func rewriteKnownMountPoint(r *os.Root, rel string, data []byte) (bool, error) {
	f, err := openNoFollow(r, rel, os.O_WRONLY, 0)
	if err != nil {
		return false, nil // the usual way will say what is wrong
	}
	defer f.Close()
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS, &st); err != nil ||
		st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 || st.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		return false, nil
	}
	return true, rewriteInPlace(f, data)
}

// rewriteInPlace writes data into f from the start, cuts it to its length
// and syncs it.
func rewriteInPlace(f *os.File, data []byte) error {
	if _, err := f.WriteAt(data, 0); err != nil {
		return fmt.Errorf("rewrite in place: %w", bare(err))
	}
	if err := f.Truncate(int64(len(data))); err != nil {
		return fmt.Errorf("rewrite in place: %w", bare(err))
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("rewrite in place: %w", bare(err))
	}
	return f.Close()
}

// isMountPoint reports whether f is the root of a mount. A kernel older
// than 5.8 cannot tell; rename(2) is busy over a regular file only when it
// is one, so it is taken to be.
func isMountPoint(f *os.File) (bool, error) {
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS, &st); err != nil {
		return false, err
	}
	if st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		return st.Mode&unix.S_IFMT == unix.S_IFREG, nil
	}
	return st.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
}

// ReadFile returns the content of the file name under root.
// Only a regular file of at most maxRead bytes is read: a FIFO or a device
// planted there would block the agent or feed it without end.
func ReadFile(root, name string) (data []byte, err error) {
	err = do("read", root, name, func(r *os.Root, rel string) error {
		fi, err := r.Lstat(rel)
		switch {
		case err != nil:
			return bare(err)
		case !fi.Mode().IsRegular():
			return errors.New("not a regular file")
		case fi.Size() > maxRead:
			return fmt.Errorf("%d bytes is more than the %d the agent reads of a file it manages", fi.Size(), maxRead)
		}
		f, err := openNoFollow(r, rel, os.O_RDONLY, 0)
		if err != nil {
			return bare(err)
		}
		defer f.Close()
		data, err = io.ReadAll(io.LimitReader(f, maxRead))
		return bare(err)
	})
	return data, err
}

// maxRead bounds the files the agent reads back: /etc/hosts, keys, its
// state. The largest real one is a few kilobytes.
const maxRead = 16 << 20

// Stat returns what the file name under root is, links followed inside
// the root.
func Stat(root, name string) (fi fs.FileInfo, err error) {
	err = do("stat", root, name, func(r *os.Root, rel string) (err error) {
		fi, err = r.Lstat(rel)
		return bare(err)
	})
	return fi, err
}

// Remove removes the file name under root. A link is followed inside the
// root: what goes is the file it names, the one the agent would have
// written, and the link stays.
func Remove(root, name string) error {
	return do("remove", root, name, func(r *os.Root, rel string) error {
		return bare(r.Remove(rel))
	})
}

// OpenFile opens the file name under root with flag (os.O_RDWR and such),
// for what is not replaced but kept open, like a lock. The name is
// resolved inside the root, and its last element then opened with
// O_NOFOLLOW. With os.O_CREATE, the directories missing above it are made.
func OpenFile(root, name string, flag int, perm fs.FileMode) (f *os.File, err error) {
	err = do("open", root, name, func(r *os.Root, rel string) (err error) {
		if flag&os.O_CREATE != 0 {
			if err := mkdirAll(r, path.Dir(rel)); err != nil {
				return bare(err)
			}
		}
		f, err = openNoFollow(r, rel, flag, perm)
		return err
	})
	return f, err
}

// do calls op with root opened and name resolved inside it; an error
// names the file root/name, after verb.
func do(verb, root, name string, op func(r *os.Root, rel string) error) error {
	err := func() error {
		r, err := os.OpenRoot(root)
		if err != nil {
			return bare(err)
		}
		// Only a directory handle: its close has nothing to report.
		defer func() { _ = r.Close() }()
		rel, err := resolve(r, name)
		if err != nil {
			return err
		}
		return op(r, rel)
	}()
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, filepath.Join(root, name), err)
	}
	return nil
}

// openNoFollow opens rel, a path in r without links, refusing a link in
// its last element (ELOOP): os.Root would follow it. The directory is
// opened through r, which keeps it inside r.
func openNoFollow(r *os.Root, rel string, flag int, perm fs.FileMode) (*os.File, error) {
	d, err := r.Open(path.Dir(rel))
	if err != nil {
		return nil, bare(err)
	}
	defer d.Close()
	fd, err := syscall.Openat(int(d.Fd()), path.Base(rel), flag|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, uint32(perm.Perm()))
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), filepath.Join(r.Name(), rel)), nil
}

// bare strips the temporary or resolved file's name from an error about
// it: the caller names the file it asked for, which is the one that
// matters.
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
func syncDir(r *os.Root, dir string) error {
	d, err := r.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, bare(err))
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, bare(err))
	}
	return nil
}
