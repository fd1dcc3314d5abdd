package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"syscall"
)

// shmDir holds the pipe files: a tmpfs on every Linux system.
const shmDir = "/dev/shm"

// shmPipeFile is the shared memory of one stream pipe: two rings of ringSize bytes, client -> daemon first.
type shmPipeFile struct {
	path       string
	ringSize   int
	mem        []byte
	unlinkOnce sync.Once
}

// createShmPipeFile creates and maps a new pipe file that only this user can open. Its pages are allocated on
// first use, so a pipe that carries little data costs little memory.
func createShmPipeFile(ringSize int) (*shmPipeFile, error) {
	var token [12]byte
	if _, err := rand.Read(token[:]); err != nil {
		return nil, err
	}
	path := fmt.Sprintf("%s/hivemind-p2pd-%d-%s", shmDir, os.Getpid(), hex.EncodeToString(token[:]))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := &shmPipeFile{path: path, ringSize: ringSize}
	if err := f.Truncate(int64(2 * ringSize)); err != nil {
		p.unlink()
		return nil, err
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, 2*ringSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		p.unlink()
		return nil, err
	}
	p.mem = mem
	return p, nil
}

// unlink removes the file name; the memory stays mapped by whoever has mapped it already.
func (p *shmPipeFile) unlink() {
	p.unlinkOnce.Do(func() { _ = os.Remove(p.path) })
}

// release unlinks the file and unmaps the memory; no ring slice may be used afterwards.
func (p *shmPipeFile) release() {
	p.unlink()
	if p.mem != nil {
		_ = syscall.Munmap(p.mem)
		p.mem = nil
	}
}
