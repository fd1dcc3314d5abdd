package main

import (
	"os"
	"sync"
)

// shmDirEnv names the directory of the pipe files (a tmpfs; /dev/shm when unset). The Python client reads the same
// variable to know where offered pipes may live, and the daemon it starts inherits it.
const shmDirEnv = "HIVEMIND_P2P_SHM_DIR"

// shmKeepFreeDivisor: a pipe file is created only if its filesystem keeps at least 1/shmKeepFreeDivisor of its size
// free afterwards, and an idle pipe is kept for reuse only while it does. /dev/shm is small in containers (64 MiB by
// default in Docker) and PyTorch DataLoader workers need it more than streams need pipes: a stream without a pipe
// just uses its socket.
const shmKeepFreeDivisor = 2

func shmPipeDir() string {
	if dir := os.Getenv(shmDirEnv); dir != "" {
		return dir
	}
	return "/dev/shm"
}

// shmPipeFile is the shared memory of one stream pipe: two rings of ringSize bytes, client -> daemon first.
type shmPipeFile struct {
	path       string
	ringSize   int
	mem        []byte
	file       *os.File // kept open with a shared flock: a daemon sweeping stale files leaves this one alone
	unlinkOnce sync.Once
}

// unlink removes the file name; the memory stays mapped by whoever has mapped it already.
func (p *shmPipeFile) unlink() {
	p.unlinkOnce.Do(func() { _ = os.Remove(p.path) })
}

// release unlinks the file and unmaps the memory; no ring slice may be used afterwards.
func (p *shmPipeFile) release() {
	p.unlink()
	if p.mem != nil {
		unmapShm(p.mem)
		p.mem = nil
	}
	if p.file != nil {
		_ = p.file.Close()
		p.file = nil
	}
}

func minUint64(a, b uint64) uint64 {
	if a < b {
		return a
	}
	return b
}
