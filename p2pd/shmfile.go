package main

import (
	"os"
	"sync"
)

// shmPipeFile is the shared memory of one stream pipe: two rings of ringSize bytes, client -> daemon first.
type shmPipeFile struct {
	path       string
	ringSize   int
	mem        []byte
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
}
