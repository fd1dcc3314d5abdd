package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"syscall"
)

// shmDir holds the pipe files: a tmpfs on every Linux system.
const shmDir = "/dev/shm"

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

func unmapShm(mem []byte) {
	_ = syscall.Munmap(mem)
}
