package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// createShmPipeFile creates and maps a new pipe file in dir that only this user can open. Every page of the file is
// reserved first (fallocate): a page of a tmpfs that cannot be backed when it is touched raises SIGBUS, which kills
// this daemon and the client that mapped the file. If the space is not there the error says so and no file is left.
func createShmPipeFile(dir string, ringSize int) (*shmPipeFile, error) {
	size := int64(2 * ringSize)
	if err := checkShmSpace(dir, size); err != nil {
		return nil, err
	}
	var token [12]byte
	if _, err := rand.Read(token[:]); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, fmt.Sprintf("hivemind-p2pd-%d-%s", os.Getpid(), hex.EncodeToString(token[:])))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := &shmPipeFile{path: path, ringSize: ringSize}
	if err := reserveShmFile(f, size); err != nil {
		p.unlink()
		return nil, err
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		p.unlink()
		return nil, err
	}
	p.mem = mem
	return p, nil
}

// reserveShmFile sets the file's size and allocates all of its pages (mode 0 fallocate), or fails with nothing
// allocated (tmpfs gives the pages of a failed fallocate back).
func reserveShmFile(f *os.File, size int64) error {
	for {
		err := syscall.Fallocate(int(f.Fd()), 0, 0, size)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("cannot reserve %d bytes for a shared-memory pipe in %s (%w): the stream uses its "+
				"socket; give the filesystem more space or point %s to a larger tmpfs", size, f.Name(), err, shmDirEnv)
		}
		return nil
	}
}

// checkShmSpace refuses a new pipe file of size bytes that would leave less than 1/shmKeepFreeDivisor of the
// filesystem free. It is only a courtesy to the other users of the filesystem: reserveShmFile is the guard.
func checkShmSpace(dir string, size int64) error {
	total, free, err := shmSpace(dir)
	if err != nil {
		return err
	}
	if total > 0 && free-size < total/shmKeepFreeDivisor {
		return fmt.Errorf("%s has %d of %d bytes free: a %d-byte shared-memory pipe would leave less than "+
			"1/%d of it free, so the stream uses its socket", dir, free, total, size, shmKeepFreeDivisor)
	}
	return nil
}

// shmKeepsSpare reports whether the filesystem of dir has its share of free space, so that an idle pipe may stay.
func shmKeepsSpare(dir string) bool {
	total, free, err := shmSpace(dir)
	return err == nil && (total == 0 || free >= total/shmKeepFreeDivisor)
}

// shmSpace returns the size of the filesystem of dir and its free bytes; 0, 0 for a tmpfs without a size limit.
func shmSpace(dir string) (total, free int64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, fmt.Errorf("cannot check the space for shared-memory pipes in %s: %w", dir, err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
}

func unmapShm(mem []byte) {
	_ = syscall.Munmap(mem)
}
