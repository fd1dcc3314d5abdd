//go:build !linux

package main

import (
	"errors"
	"sync"
)

type shmPipeFile struct {
	path       string
	ringSize   int
	mem        []byte
	unlinkOnce sync.Once
}

func createShmPipeFile(ringSize int) (*shmPipeFile, error) {
	return nil, errors.New("shared-memory stream pipes are only supported on Linux")
}

func (p *shmPipeFile) unlink()  {}
func (p *shmPipeFile) release() {}
